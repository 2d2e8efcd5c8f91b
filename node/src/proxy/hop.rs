//! What changes as a request or response crosses one hop of the mesh (app
//! to outbound listener, caller node to owner node, owner to instance):
//! hop-by-hop headers stay behind, the HTTP version is the one the next
//! hop speaks, and the mesh counts the hops to cut loops.

use http::{HeaderMap, HeaderName, HeaderValue, Version};

/// How many outbound listeners a request has passed; see [`MAX_HOPS`].
pub const HOPS_HEADER: HeaderName = HeaderName::from_static("x-gossamer-hops");
/// A request that passed this many outbound listeners is looping.
pub const MAX_HOPS: u32 = 8;

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1), except
/// `te: trailers`, which HTTP/2 allows and gRPC servers require.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The tokens of the `Connection` headers, trimmed, as sent (compare them
/// without case): `upgrade`, and the names of further headers the sender
/// declared hop-by-hop.
pub fn connection_tokens(map: &HeaderMap) -> impl Iterator<Item = &str> + '_ {
    map.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The names a `Connection` header adds to the standard hop-by-hop ones,
/// lower-cased. Those it names that are hop-by-hop anyway (the usual
/// `keep-alive`, `upgrade`) add nothing, and nothing is allocated for them.
fn listed(map: &HeaderMap) -> Vec<String> {
    connection_tokens(map)
        .filter(|t| !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h)))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The end-to-end headers of `map`, in order. `keep_upgrade` keeps the
/// `upgrade` and `connection` headers, which an upgrade request (and its
/// `101` answer) needs on the next hop too.
pub fn end_to_end(
    map: &HeaderMap,
    keep_upgrade: bool,
) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = listed(map);
    map.iter().filter(move |(name, value)| {
        let n = name.as_str();
        if keep_upgrade && (n == "upgrade" || n == "connection") {
            return true;
        }
        if n == "te" {
            return is_te_trailers(value);
        }
        !HOP_BY_HOP.contains(&n) && !listed.iter().any(|l| l == n)
    })
}

/// A copy of `map` without its hop-by-hop headers; see [`end_to_end`]. The
/// reference [`strip`] is tested against.
#[cfg(test)]
pub fn clean(map: &HeaderMap, keep_upgrade: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(map.len());
    for (name, value) in end_to_end(map, keep_upgrade) {
        out.append(name.clone(), value.clone());
    }
    out
}

/// Drops `map`'s hop-by-hop headers in place: what [`clean`] leaves,
/// without copying the rest (the order of different names may change,
/// which HTTP gives no meaning to).
pub fn strip(map: &mut HeaderMap, keep_upgrade: bool) {
    // As names, not text: removing by a name skips parsing it.
    const NAMES: [HeaderName; 8] = [
        http::header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        http::header::PROXY_AUTHENTICATE,
        http::header::PROXY_AUTHORIZATION,
        http::header::TE,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ];
    // `te` is filtered by value below; an upgrade keeps its own headers.
    let spared =
        |name: &str| name == "te" || keep_upgrade && (name == "upgrade" || name == "connection");
    let listed = listed(map);
    for name in NAMES.iter().filter(|n| !spared(n.as_str())) {
        map.remove(name);
    }
    for name in listed.iter().filter(|n| !spared(n)) {
        map.remove(name.as_str());
    }
    if !map.get_all(http::header::TE).iter().all(is_te_trailers) {
        let kept: Vec<HeaderValue> = map
            .get_all(http::header::TE)
            .iter()
            .filter(|v| is_te_trailers(v))
            .cloned()
            .collect();
        map.remove(http::header::TE);
        for v in kept {
            map.append(http::header::TE, v);
        }
    }
}

fn is_te_trailers(value: &HeaderValue) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
}

/// The version a request goes out in: HTTP/2 to a hop that speaks it,
/// HTTP/1.1 otherwise (HTTP/1.0 callers included: the proxy speaks 1.1).
pub fn version(h2: bool) -> Version {
    if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    }
}

/// The caller's version as a proxy stream carries it
/// ([`RequestHead::version`](super::wire::RequestHead::version)).
pub fn version_to_wire(version: Version) -> u8 {
    if version == Version::HTTP_2 { 2 } else { 1 }
}

/// How access logs and spans name a version.
pub fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// The inverse of [`version_to_wire`].
pub fn version_from_wire(byte: u8) -> Version {
    version(byte == 2)
}

/// Removes the mesh's own `x-gossamer-*` headers: from a request that
/// comes from outside the mesh, or one that leaves it.
pub fn strip_internal(map: &mut HeaderMap) {
    let internal: Vec<_> = map
        .keys()
        .filter(|k| k.as_str().starts_with("x-gossamer-"))
        .cloned()
        .collect();
    for k in internal {
        map.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(map: &HeaderMap) -> Vec<&str> {
        map.keys().map(HeaderName::as_str).collect()
    }

    #[test]
    fn listed_and_standard_hop_by_hop_headers_are_dropped() {
        let mut map = HeaderMap::new();
        map.insert("connection", "keep-alive, X-Private".parse().unwrap());
        map.insert("x-private", "1".parse().unwrap());
        map.insert("keep-alive", "timeout=5".parse().unwrap());
        map.insert("upgrade", "websocket".parse().unwrap());
        map.insert("te", "gzip".parse().unwrap());
        map.append("traceparent", "00-abc-def-01".parse().unwrap());
        map.append("accept", "a".parse().unwrap());
        map.append("accept", "b".parse().unwrap());
        let out = clean(&map, false);
        assert_eq!(names(&out), ["traceparent", "accept"]);
        assert_eq!(out.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut map = HeaderMap::new();
        map.insert("connection", "Upgrade".parse().unwrap());
        map.insert("upgrade", "websocket".parse().unwrap());
        map.insert("keep-alive", "timeout=5".parse().unwrap());
        assert_eq!(names(&clean(&map, true)), ["connection", "upgrade"]);
        assert!(clean(&map, false).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn stripping_in_place_leaves_what_cleaning_copies(
            fields in proptest::collection::vec((0usize..9, 0usize..6), 0..12),
            keep_upgrade: bool,
        ) {
            const NAMES: [&str; 9] = [
                "connection", "keep-alive", "te", "upgrade", "x-private",
                "accept", "transfer-encoding", "proxy-authorization", "traceparent",
            ];
            const VALUES: [&str; 6] =
                ["keep-alive, X-Private", "Upgrade", "trailers", "gzip", " Trailers ", "a"];
            let mut map = HeaderMap::new();
            for (n, v) in fields {
                map.append(NAMES[n], HeaderValue::from_static(VALUES[v]));
            }
            let mut stripped = map.clone();
            strip(&mut stripped, keep_upgrade);
            proptest::prop_assert_eq!(stripped, clean(&map, keep_upgrade));
        }
    }

    #[test]
    fn strip_names_the_same_headers_as_the_list() {
        let mut map = HeaderMap::new();
        for name in HOP_BY_HOP {
            map.append(name, HeaderValue::from_static("x"));
        }
        strip(&mut map, false);
        assert!(map.is_empty(), "left {:?}", names(&map));
    }

    #[test]
    fn versions_round_trip_through_the_wire() {
        for (v, byte, out) in [
            (Version::HTTP_2, 2, Version::HTTP_2),
            (Version::HTTP_11, 1, Version::HTTP_11),
            (Version::HTTP_10, 1, Version::HTTP_11),
        ] {
            assert_eq!(version_to_wire(v), byte);
            assert_eq!(version_from_wire(byte), out);
        }
    }
}
