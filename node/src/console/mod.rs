//! The web console: one page and its script and style, compiled into the
//! binary and served by the admin listener at `/ui/`. The page reads only
//! the admin API (members, catalog, stats, config, events, tap), so it
//! shows what this agent sees and needs nothing else: no CDN, no build
//! step, no server.

/// `(content type, body)` of a console asset, by its name under `/ui/`.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "" | "index.html" => ("text/html; charset=utf-8", include_str!("index.html")),
        "app.js" => ("text/javascript; charset=utf-8", include_str!("app.js")),
        "app.css" => ("text/css; charset=utf-8", include_str!("app.css")),
        "icon.svg" => ("image/svg+xml", include_str!("icon.svg")),
        _ => return None,
    })
}

/// What the page may load: only from this agent, no inline script.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_small_and_names_only_its_own_assets() {
        let total: usize = ["", "app.js", "app.css", "icon.svg"]
            .iter()
            .map(|n| asset(n).unwrap().1.len())
            .sum();
        assert!(total <= 200 * 1024, "the console weighs {total} bytes");
        let (_, page) = asset("").unwrap();
        assert!(page.contains("/ui/app.js") && page.contains("/ui/app.css"));
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(!asset("app.js").unwrap().1.contains("https://"));
        assert!(asset("../admin.rs").is_none());
    }
}
