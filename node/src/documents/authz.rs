//! The `authz` document: who may call one destination service, enforced by
//! the agent that hosts it. The document named `*` holds the mesh-wide
//! default.
//!
//! ```toml
//! [[authz]]
//! name = "db"                       # the destination service
//! default = "deny"                  # allow | deny | audit
//!
//! [[authz.rule]]
//! from = { services = ["api"] }     # or nodes = ["n4"], or "*"
//! action = "allow"
//! http = { paths = [{ prefix = "/v1/" }], methods = ["GET"] }
//!
//! [[authz]]
//! name = "*"                        # the mesh-wide default
//! default = "allow"
//! ```
//!
//! Every field is checked where a document is applied and wherever it
//! arrives; mistakes are refused with the field named.

use serde::Deserialize;
use serde_json::Value;

use super::route::{ValueMatch, value_matches};

/// Rules per document.
pub const MAX_RULES: usize = 256;
/// Names (services, nodes, paths, methods, headers) per rule.
pub const MAX_NAMES: usize = 64;
/// The name of the document holding the mesh-wide default.
pub const MESH_DEFAULT: &str = "*";

/// What happens to a request no rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Default {
    /// Let it through.
    Allow,
    /// Refuse it (403).
    Deny,
    /// Let it through, but log and count it as a denial would be.
    Audit,
}

impl Default {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let matching requests through.
    Allow,
    /// Refuse them.
    Deny,
}

/// An `authz` document's body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzSpec {
    /// For requests no rule decides (absent: the mesh-wide default's,
    /// which is `allow` unless a `*` document says otherwise).
    #[serde(default)]
    pub default: Option<Default>,
    /// Rules (their order does not matter: see `docs/security.md`).
    #[serde(default, rename = "rule")]
    pub rules: Vec<AuthzRule>,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Who: `"*"`, or `{ services = [...], nodes = [...] }`.
    pub from: Value,
    /// Allow or deny.
    pub action: Action,
    /// Only these requests (absent: all, which makes the rule L4).
    #[serde(default)]
    pub http: Option<HttpMatch>,
}

/// Which requests a rule covers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    /// Any of these paths.
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// All of these header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// A path, exact or by prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// The whole path.
    #[serde(default)]
    pub exact: Option<String>,
    /// A prefix of it.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A rule's `from`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sources {
    /// Every caller.
    Any,
    /// Callers that are one of `nodes` or host one of `services`.
    Some {
        /// Service names.
        services: Vec<String>,
        /// Node names.
        nodes: Vec<String>,
    },
}

/// Reads a rule's `from`: `"*"`, or a table of `services` and `nodes`.
pub fn sources(field: &str, from: &Value) -> Result<Sources, String> {
    let shape = || format!("{field}: give \"*\" or {{ services = [...], nodes = [...] }}");
    match from {
        Value::String(s) if s == "*" => Ok(Sources::Any),
        Value::Object(map) => {
            let list = |key: &str| -> Result<Vec<String>, String> {
                match map.get(key) {
                    None => Ok(Vec::new()),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_owned)
                                .ok_or_else(|| format!("{field}.{key}: names must be strings"))
                        })
                        .collect(),
                    Some(_) => Err(format!("{field}.{key}: must be a list of names")),
                }
            };
            if let Some(k) = map.keys().find(|k| *k != "services" && *k != "nodes") {
                return Err(format!(
                    "{field}: unknown field `{k}`, expected `services` or `nodes`"
                ));
            }
            let (services, nodes) = (list("services")?, list("nodes")?);
            if services.is_empty() && nodes.is_empty() {
                return Err(format!(
                    "{field}: names no service and no node; use \"*\" for everyone"
                ));
            }
            if services.len() + nodes.len() > MAX_NAMES {
                return Err(format!("{field}: more than {MAX_NAMES} names"));
            }
            for s in &services {
                gossamer_membership::catalog::validate_service_name(s)
                    .map_err(|e| format!("{field}.services: {e}"))?;
            }
            for n in &nodes {
                gossamer_membership::identity::validate_name(n)
                    .map_err(|e| format!("{field}.nodes: {e}"))?;
            }
            Ok(Sources::Some { services, nodes })
        }
        _ => Err(shape()),
    }
}

impl AuthzSpec {
    /// Checks what serde cannot, for the document named `name`. Errors name
    /// the field.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if name == MESH_DEFAULT {
            if self.default.is_none() {
                return Err("default: the mesh-wide document (name \"*\") must set it".into());
            }
            if !self.rules.is_empty() {
                return Err(
                    "rule: the mesh-wide document (name \"*\") holds only the default; rules belong in a service's document".into(),
                );
            }
        }
        if self.rules.len() > MAX_RULES {
            return Err(format!("rule: more than {MAX_RULES} rules"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let f = format!("rule[{i}]");
            sources(&format!("{f}.from"), &rule.from)?;
            let Some(http) = &rule.http else { continue };
            if http.paths.len() > MAX_NAMES
                || http.methods.len() > MAX_NAMES
                || http.headers.len() > MAX_NAMES
            {
                return Err(format!(
                    "{f}.http: more than {MAX_NAMES} conditions of one kind"
                ));
            }
            for (j, p) in http.paths.iter().enumerate() {
                match (p.exact.as_deref(), p.prefix.as_deref()) {
                    (Some(v), None) | (None, Some(v)) if v.starts_with('/') => {}
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(format!("{f}.http.paths[{j}]: must start with /"));
                    }
                    _ => {
                        return Err(format!(
                            "{f}.http.paths[{j}]: give exactly one of exact, prefix"
                        ));
                    }
                }
            }
            for (j, m) in http.methods.iter().enumerate() {
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("{f}.http.methods[{j}]: {m:?} is not a method"))?;
            }
            value_matches(&format!("{f}.http.headers"), &http.headers, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<AuthzSpec, String> {
        let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
        let spec: AuthzSpec = serde_json::from_value(json).map_err(|e| e.to_string())?;
        spec.validate(name)?;
        Ok(spec)
    }

    #[test]
    fn a_full_document_parses() {
        let spec = parse(
            "db",
            r#"
            default = "deny"
            [[rule]]
            from = { services = ["api"], nodes = ["n4"] }
            action = "allow"
            http = { paths = [{ prefix = "/v1/" }, { exact = "/health" }], methods = ["GET"] }
            [[rule]]
            from = "*"
            action = "deny"
            http = { headers = [{ name = "x-debug", present = true }] }
            "#,
        )
        .unwrap();
        assert_eq!(spec.default, Some(Default::Deny));
        assert_eq!(
            sources("from", &spec.rules[0].from).unwrap(),
            Sources::Some {
                services: vec!["api".into()],
                nodes: vec!["n4".into()]
            }
        );
        assert_eq!(sources("from", &spec.rules[1].from).unwrap(), Sources::Any);
        assert!(parse("*", "default = \"audit\"").is_ok());
    }

    #[test]
    fn mistakes_name_the_field() {
        let cases = [
            ("db", "default = \"maybe\"", "unknown variant `maybe`"),
            (
                "db",
                "[[rule]]\nfrom = \"everyone\"\naction = \"allow\"",
                "rule[0].from: give \"*\"",
            ),
            (
                "db",
                "[[rule]]\nfrom = {}\naction = \"allow\"",
                "rule[0].from: names no service",
            ),
            (
                "db",
                "[[rule]]\nfrom = { service = [\"a\"] }\naction = \"allow\"",
                "unknown field `service`",
            ),
            (
                "db",
                "[[rule]]\nfrom = { services = [\"Bad!\"] }\naction = \"allow\"",
                "rule[0].from.services",
            ),
            (
                "db",
                "[[rule]]\nfrom = \"*\"\naction = \"permit\"",
                "unknown variant `permit`",
            ),
            (
                "db",
                "[[rule]]\nfrom = \"*\"\naction = \"deny\"\nhttp = { paths = [{ prefix = \"v1\" }] }",
                "rule[0].http.paths[0]: must start with /",
            ),
            (
                "db",
                "[[rule]]\nfrom = \"*\"\naction = \"deny\"\nhttp = { methods = [\"G T\"] }",
                "rule[0].http.methods[0]",
            ),
            (
                "*",
                "[[rule]]\nfrom = \"*\"\naction = \"deny\"",
                "default: the mesh-wide document",
            ),
            (
                "*",
                "default = \"deny\"\n[[rule]]\nfrom = \"*\"\naction = \"deny\"",
                "rules belong",
            ),
            ("db", "colour = 1", "unknown field `colour`"),
        ];
        for (name, text, want) in cases {
            let e = parse(name, text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
    }
}
