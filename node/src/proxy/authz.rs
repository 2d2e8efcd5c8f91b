//! Authorization from `authz` documents, compiled for the request path and
//! enforced by the agent that hosts the destination instance (the only
//! place that can be trusted to), whether the caller is another node or an
//! application on this one.
//!
//! The caller is what the mTLS handshake proved: its node name, and the
//! services its certificate names. A certificate that allows any service
//! (`--service '*'`) names none in particular: it matches rules that name
//! its node or `"*"`.
//!
//! Of the rules that match a request, the most specific decides: one that
//! names the caller's node beats one that names a service it hosts, which
//! beats `"*"`; then an exact path beats a prefix (the longer the better),
//! which beats a rule on methods or headers only, which beats a rule with
//! no `http` block. Between equally specific rules, deny wins. With no
//! match, the document's default applies, else the mesh-wide one (`*`),
//! else allow.

use std::collections::HashMap;
use std::sync::Arc;

use gossamer_transport::pki::Hosts;
use http::{HeaderMap, Method};

use super::policy::HeaderConditions;
use crate::documents::authz::{Action, AuthzSpec, Default, Sources, sources};

/// A compiled rule.
#[derive(Debug)]
struct Rule {
    index: usize,
    action: Action,
    sources: Sources,
    exact: Vec<String>,
    prefixes: Vec<String>,
    methods: Vec<Method>,
    headers: HeaderConditions,
    /// Whether it has an `http` block at all.
    l7: bool,
}

/// Who is calling, as proved by mTLS.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The calling node.
    pub node: &'a str,
    /// What its certificate lets it host.
    pub hosts: &'a Hosts,
}

/// What a request looks like to the rules.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Its method.
    pub method: &'a Method,
    /// Its path (no query).
    pub path: &'a str,
    /// Its headers.
    pub headers: &'a HeaderMap,
}

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on (audit denials do).
    pub allowed: bool,
    /// What decided: `allow`, `deny`, or `audit` (a denial let through).
    pub decision: &'static str,
    /// The rule that decided (its index), or `None` for the default.
    pub rule: Option<usize>,
    /// Whether a document applied at all (no: the mesh allows by default
    /// and nothing is counted).
    pub governed: bool,
}

impl Decision {
    /// `rule N` or `default`, for headers, metrics and logs.
    pub fn rule_label(&self) -> String {
        self.rule
            .map_or_else(|| "default".to_owned(), |r| format!("rule {r}"))
    }
}

/// One service's compiled document.
#[derive(Debug)]
pub struct Authz {
    /// Its version.
    pub version: u64,
    default: Option<Default>,
    rules: Vec<Rule>,
}

impl Authz {
    /// Compiles a checked document for `service`.
    pub fn compile(service: &str, version: u64, spec: &AuthzSpec) -> Result<Self, String> {
        spec.validate(service)?;
        let mut rules = Vec::with_capacity(spec.rules.len());
        for (index, r) in spec.rules.iter().enumerate() {
            let http = r.http.clone().unwrap_or_default();
            rules.push(Rule {
                index,
                action: r.action,
                sources: sources("from", &r.from)?,
                exact: http.paths.iter().filter_map(|p| p.exact.clone()).collect(),
                prefixes: http.paths.iter().filter_map(|p| p.prefix.clone()).collect(),
                methods: http
                    .methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
                headers: HeaderConditions::of(&http.headers)?,
                l7: r.http.is_some(),
            });
        }
        Ok(Self {
            version,
            default: spec.default,
            rules,
        })
    }
}

/// How specifically a rule matched: compared as a whole, larger wins.
type Specificity = (u8, u8, usize);

impl Rule {
    /// How specifically the rule matches this call, or `None`.
    fn matches(&self, caller: Caller<'_>, req: Option<Request<'_>>) -> Option<Specificity> {
        let source = match &self.sources {
            Sources::Any => 0,
            Sources::Some { services, nodes } => {
                if nodes.iter().any(|n| n == caller.node) {
                    2
                } else if matches!(caller.hosts, Hosts::Only(own) if own.iter().any(|s| services.contains(s)))
                {
                    1
                } else {
                    return None;
                }
            }
        };
        let Some(req) = req else {
            // A TCP stream: only rules without an `http` block speak of it.
            return (!self.l7).then_some((source, 0, 0));
        };
        if !self.methods.is_empty() && !self.methods.contains(req.method) {
            return None;
        }
        if !self.headers.hold(req.headers) {
            return None;
        }
        let (path, length) = if self.exact.is_empty() && self.prefixes.is_empty() {
            (u8::from(self.l7), 0)
        } else if self.exact.iter().any(|e| e == req.path) {
            (3, req.path.len())
        } else {
            let longest = self
                .prefixes
                .iter()
                .filter(|p| req.path.starts_with(p.as_str()))
                .map(String::len)
                .max()?;
            (2, longest)
        };
        Some((source, path, length))
    }
}

/// Every `authz` document in force, compiled.
#[derive(Debug, Default)]
pub struct AuthzTable {
    /// The mesh-wide default (`*` document), if any.
    pub mesh_default: Option<Default>,
    /// Per destination service.
    pub services: HashMap<String, Arc<Authz>>,
}

impl AuthzTable {
    /// Decides whether `caller` may make `req` to `service`.
    pub fn decide(&self, service: &str, caller: Caller<'_>, req: Request<'_>) -> Decision {
        self.decide_for(service, caller, Some(req))
    }

    /// Decides whether `caller` may open a TCP stream to `service`: only
    /// the rules without an `http` block (L4 rules) apply, then the
    /// defaults.
    pub fn decide_stream(&self, service: &str, caller: Caller<'_>) -> Decision {
        self.decide_for(service, caller, None)
    }

    fn decide_for(&self, service: &str, caller: Caller<'_>, req: Option<Request<'_>>) -> Decision {
        let doc = self.services.get(service);
        let mut best: Option<(Specificity, bool, usize)> = None;
        for rule in doc.map_or(&[][..], |d| &d.rules[..]) {
            let Some(spec) = rule.matches(caller, req) else {
                continue;
            };
            let deny = rule.action == Action::Deny;
            // Larger specificity wins; then deny; then the earlier rule.
            let better = match best {
                None => true,
                Some((s, d, _)) => spec > s || (spec == s && deny && !d),
            };
            if better {
                best = Some((spec, deny, rule.index));
            }
        }
        let default = doc.and_then(|d| d.default).or(self.mesh_default);
        match (best, default) {
            (Some((_, false, i)), _) => Decision {
                allowed: true,
                decision: "allow",
                rule: Some(i),
                governed: true,
            },
            (Some((_, true, i)), d) => {
                // An audit default turns every denial into a logged pass.
                let audit = d == Some(Default::Audit);
                Decision {
                    allowed: audit,
                    decision: if audit { "audit" } else { "deny" },
                    rule: Some(i),
                    governed: true,
                }
            }
            (None, Some(Default::Deny)) => Decision {
                allowed: false,
                decision: "deny",
                rule: None,
                governed: true,
            },
            (None, Some(Default::Audit)) => Decision {
                allowed: true,
                decision: "audit",
                rule: None,
                governed: true,
            },
            (None, d) => Decision {
                allowed: true,
                decision: "allow",
                rule: None,
                governed: d.is_some() || doc.is_some(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(service: &str, text: &str, mesh: Option<Default>) -> AuthzTable {
        let value: toml::Value = toml::from_str(text).unwrap();
        let spec: AuthzSpec = serde_json::from_value(serde_json::to_value(value).unwrap()).unwrap();
        let mut services = HashMap::new();
        services.insert(
            service.to_owned(),
            Arc::new(Authz::compile(service, 1, &spec).unwrap()),
        );
        AuthzTable {
            mesh_default: mesh,
            services,
        }
    }

    fn decide(
        t: &AuthzTable,
        node: &str,
        hosts: &[&str],
        method: &str,
        path: &str,
    ) -> (bool, String) {
        let hosts = Hosts::Only(hosts.iter().map(|s| s.to_string()).collect());
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let headers = HeaderMap::new();
        let v = t.decide(
            "db",
            Caller {
                node,
                hosts: &hosts,
            },
            Request {
                method: &method,
                path,
                headers: &headers,
            },
        );
        (v.allowed, format!("{} {}", v.decision, v.rule_label()))
    }

    #[test]
    fn most_specific_wins_and_deny_breaks_ties() {
        let t = table(
            "db",
            r#"
            default = "deny"
            [[rule]]
            from = { services = ["api"] }
            action = "allow"
            [[rule]]
            from = { services = ["api"] }
            action = "deny"
            http = { paths = [{ prefix = "/admin" }] }
            [[rule]]
            from = { nodes = ["n9"] }
            action = "allow"
            http = { paths = [{ prefix = "/admin" }] }
            [[rule]]
            from = "*"
            action = "allow"
            http = { paths = [{ exact = "/ping" }], methods = ["GET"] }
            [[rule]]
            from = "*"
            action = "deny"
            http = { paths = [{ exact = "/ping" }], methods = ["GET"] }
            [[rule]]
            from = { services = ["web"] }
            action = "allow"
            http = { paths = [{ prefix = "/public/" }], methods = ["GET"] }
            "#,
            None,
        );
        assert_eq!(
            decide(&t, "n2", &["api"], "GET", "/x"),
            (true, "allow rule 0".into())
        );
        assert_eq!(
            decide(&t, "n2", &["api"], "GET", "/admin/x"),
            (false, "deny rule 1".into())
        );
        // The node is more specific than its service.
        assert_eq!(
            decide(&t, "n9", &["api"], "GET", "/admin/x"),
            (true, "allow rule 2".into())
        );
        // Equally specific: deny wins.
        assert_eq!(
            decide(&t, "n1", &["web"], "GET", "/ping"),
            (false, "deny rule 4".into())
        );
        assert_eq!(
            decide(&t, "n1", &["web"], "GET", "/public/a"),
            (true, "allow rule 5".into())
        );
        assert_eq!(
            decide(&t, "n1", &["web"], "POST", "/public/a"),
            (false, "deny default".into())
        );
        assert_eq!(
            decide(&t, "n1", &["web"], "GET", "/private"),
            (false, "deny default".into())
        );
        // A wildcard certificate names no service in particular.
        let any = Hosts::Any;
        let m = Method::GET;
        let h = HeaderMap::new();
        let v = t.decide(
            "db",
            Caller {
                node: "n5",
                hosts: &any,
            },
            Request {
                method: &m,
                path: "/x",
                headers: &h,
            },
        );
        assert!(!v.allowed);
    }

    #[test]
    fn defaults_and_audit() {
        let none = AuthzTable::default();
        let hosts = Hosts::Only(vec![]);
        let (m, h) = (Method::GET, HeaderMap::new());
        let req = Request {
            method: &m,
            path: "/",
            headers: &h,
        };
        let v = none.decide(
            "db",
            Caller {
                node: "n1",
                hosts: &hosts,
            },
            req,
        );
        assert!(v.allowed && !v.governed);
        let mesh_deny = AuthzTable {
            mesh_default: Some(Default::Deny),
            services: HashMap::new(),
        };
        assert!(
            !mesh_deny
                .decide(
                    "db",
                    Caller {
                        node: "n1",
                        hosts: &hosts
                    },
                    req
                )
                .allowed
        );
        let audit = table(
            "db",
            "default = \"audit\"\n[[rule]]\nfrom = \"*\"\naction = \"deny\"\nhttp = { methods = [\"DELETE\"] }",
            Some(Default::Deny),
        );
        assert_eq!(
            decide(&audit, "n1", &[], "GET", "/"),
            (true, "audit default".into())
        );
        assert_eq!(
            decide(&audit, "n1", &[], "DELETE", "/"),
            (true, "audit rule 0".into())
        );
        // The service's default beats the mesh's.
        let allow = table("db", "default = \"allow\"", Some(Default::Deny));
        assert_eq!(
            decide(&allow, "n1", &[], "GET", "/"),
            (true, "allow default".into())
        );
    }
}
