//! Which proxy a request goes through: `http_proxy` for `http://` URLs,
//! `https_proxy` (a `CONNECT` tunnel) for `https://` ones, `no_proxy` for
//! the hosts that are reached directly; lower-case names win over the
//! upper-case forms, as in curl. Only `http://` proxies are supported.

use super::url::{host_port, Target};
use crate::error::{Error, Result};

/// The proxies of one run (none with `--no-proxy`).
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    http: Option<Target>,
    https: Option<Target>,
    /// `no_proxy` entries, lower case: `*`, `host`, `.domain`, `host:port`.
    bypass: Vec<String>,
}

impl Proxies {
    /// Reads `http_proxy`, `https_proxy`, `no_proxy` and their upper-case
    /// forms from `env`; a proxy URL the agent cannot use is an error
    /// naming the variable.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Proxies> {
        let pick = |lower: &'static str, upper: &'static str| {
            env(lower)
                .map(|v| (lower, v))
                .or_else(|| env(upper).map(|v| (upper, v)))
        };
        let proxy = |found: Option<(&'static str, String)>| -> Result<Option<Target>> {
            let Some((name, value)) = found else {
                return Ok(None);
            };
            let value = value.trim();
            let url = if value.contains("://") {
                value.to_string()
            } else {
                format!("http://{value}")
            };
            match Target::parse(&url) {
                Some(t) if !t.https => Ok(Some(t)),
                _ => Err(Error::Usage(format!(
                    "${name} \"{}\" is not an http:// proxy URL (host:port or http://host:port)",
                    crate::protocol::one_line(value, 200)
                ))),
            }
        };
        let bypass = pick("no_proxy", "NO_PROXY")
            .map(|(_, v)| {
                v.split([',', ' '])
                    .map(|e| e.trim().to_ascii_lowercase())
                    .filter(|e| !e.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Proxies {
            http: proxy(pick("http_proxy", "HTTP_PROXY"))?,
            https: proxy(pick("https_proxy", "HTTPS_PROXY"))?,
            bypass,
        })
    }

    /// The proxy for `target`, if any.
    pub fn for_target(&self, target: &Target) -> Option<&Target> {
        let proxy = if target.https {
            self.https.as_ref()
        } else {
            self.http.as_ref()
        }?;
        (!self.bypasses(target)).then_some(proxy)
    }

    /// Whether `no_proxy` names `target`: `*`; the host itself; a domain
    /// (`example.com` or `.example.com`) and every host below it; any of
    /// these with `:port`, then only on that port. IPv6 literals as
    /// `::1` or `[::1]`.
    fn bypasses(&self, target: &Target) -> bool {
        let host = target.host.to_ascii_lowercase();
        self.bypass.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, port) = if entry.contains("::") && !entry.starts_with('[') {
                (entry.clone(), None) // a bare IPv6 address has no port
            } else {
                match host_port(entry) {
                    Some(split) => split,
                    None => return false,
                }
            };
            if port.is_some_and(|p| p != target.port) {
                return false;
            }
            let domain = name.trim_start_matches("*.").trim_start_matches('.');
            !domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|sub| sub.ends_with('.')))
        })
    }

    /// Whether any proxy is configured (for the debug log).
    pub fn any(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(vars: &[(&str, &str)]) -> Result<Proxies> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Proxies::from_env(&|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.for_target(&Target::parse(url).unwrap())
            .map(|t| t.authority.clone())
    }

    #[test]
    fn scheme_picks_the_variable_and_lower_case_wins() {
        let p = proxies(&[
            ("http_proxy", "http://p:1"),
            ("HTTP_PROXY", "http://upper:9"),
            ("HTTPS_PROXY", "q:2"),
        ])
        .unwrap();
        assert_eq!(via(&p, "http://h/a").as_deref(), Some("p:1"));
        assert_eq!(via(&p, "https://h/a").as_deref(), Some("q:2"));
        let p = proxies(&[("https_proxy", "http://q:2")]).unwrap();
        assert_eq!(via(&p, "http://h/a"), None);
        assert!(!proxies(&[]).unwrap().any());
    }

    #[test]
    fn unusable_proxy_urls_name_the_variable() {
        let e = proxies(&[("https_proxy", "https://p:1")]).unwrap_err();
        assert!(e.to_string().contains("$https_proxy"), "{e}");
        let e = proxies(&[("HTTP_PROXY", "http://p:port")]).unwrap_err();
        assert!(e.to_string().contains("$HTTP_PROXY"), "{e}");
    }

    #[test]
    fn no_proxy_hosts_domains_star_and_ports() {
        let p = proxies(&[
            ("http_proxy", "p:1"),
            (
                "no_proxy",
                "localhost, .corp.example,Other.Example , h:8081 ,::1,[fe80::1]:9",
            ),
        ])
        .unwrap();
        for direct in [
            "http://localhost:5/",
            "http://a.corp.example/",
            "http://corp.example/",
            "http://other.example/",
            "http://x.other.example/",
            "http://h:8081/",
            "http://[::1]:8081/",
            "http://[fe80::1]:9/",
        ] {
            assert_eq!(via(&p, direct), None, "{direct}");
        }
        for proxied in [
            "http://notcorp.example/",
            "http://h:8082/",
            "http://h/",
            "http://localhost.evil/",
            "http://[fe80::1]:10/",
            "http://127.0.0.1/",
        ] {
            assert_eq!(via(&p, proxied).as_deref(), Some("p:1"), "{proxied}");
        }
        let p = proxies(&[("http_proxy", "p:1"), ("NO_PROXY", "*")]).unwrap();
        assert_eq!(via(&p, "http://anything/"), None);
    }
}
