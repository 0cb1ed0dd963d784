//! URLs as the agent's client needs them: `http://` and `https://` only,
//! IPv6 literals in brackets (`http://[::1]:8081/api/v1`), userinfo never
//! sent on, fragments dropped.

/// The parts of a URL a request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https://`.
    pub https: bool,
    /// Host name or IP address, without brackets (`::1`).
    pub host: String,
    /// Port, the scheme's default when none is written.
    pub port: u16,
    /// `host[:port]` as written (brackets kept), for the Host header.
    pub authority: String,
    /// Path and query, at least "/".
    pub path: String,
    /// `user:password` before the `@`, if any (proxies only).
    pub userinfo: Option<String>,
}

impl Target {
    /// Parses an `http://` or `https://` URL; `None` for anything else.
    pub fn parse(url: &str) -> Option<Target> {
        let (https, rest) = match url.split_once("://")? {
            (s, rest) if s.eq_ignore_ascii_case("http") => (false, rest),
            (s, rest) if s.eq_ignore_ascii_case("https") => (true, rest),
            _ => return None,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let path = path.split('#').next().unwrap_or("");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let (userinfo, authority) = match authority.rsplit_once('@') {
            Some((u, a)) => (Some(u.to_string()), a), // never sent in Host
            None => (None, authority),
        };
        let (host, port) = host_port(authority)?;
        if host.is_empty() {
            return None;
        }
        Some(Target {
            https,
            host,
            port: port.unwrap_or(if https { 443 } else { 80 }),
            authority: authority.to_string(),
            path,
            userinfo,
        })
    }

    /// `scheme://authority`, what a token is bound to.
    pub fn origin(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}", bracket(&self.host), self.port)
    }
}

/// Splits `host[:port]` or `[v6][:port]`; `None` when the port is not a number.
pub fn host_port(authority: &str) -> Option<(String, Option<u16>)> {
    match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?.parse().ok()?),
            };
            Some((host.to_string(), port))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
            None => Some((authority.to_string(), None)),
        },
    }
}

/// A host as written in a URL or a CONNECT line: IPv6 in brackets.
pub fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `scheme://host:port` of a URL as written (the part a token is bound to).
pub fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    let end = url[rest..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| rest + i);
    &url[..end]
}

/// Whether two URLs share an origin, default ports and case accounted for.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (Target::parse(a), Target::parse(b)) {
        (Some(a), Some(b)) => a.origin().eq_ignore_ascii_case(&b.origin()),
        _ => false,
    }
}

/// Resolves a redirect `Location` against the URL that answered.
pub fn resolve(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Some(location.to_string())
    } else if location.starts_with("//") {
        let scheme = &base[..base.find("://")?];
        Some(format!("{scheme}:{location}"))
    } else if location.starts_with('/') {
        Some(format!("{}{location}", origin(base)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Option<(bool, &str, u16, &str, &str)>) {
        let got = Target::parse(url).map(|t| (t.https, t.host, t.port, t.authority, t.path));
        let want = expected
            .map(|(s, h, p, a, path)| (s, h.to_string(), p, a.to_string(), path.to_string()));
        assert_eq!(got, want, "{url}");
    }

    #[test]
    fn targets() {
        check(
            "http://127.0.0.1:8081/api/v1/download/app?arch=x86_64",
            Some((
                false,
                "127.0.0.1",
                8081,
                "127.0.0.1:8081",
                "/api/v1/download/app?arch=x86_64",
            )),
        );
        check(
            "https://cdn.example/app",
            Some((true, "cdn.example", 443, "cdn.example", "/app")),
        );
        check("http://h", Some((false, "h", 80, "h", "/")));
        check("http://h?x=1#frag", Some((false, "h", 80, "h", "/?x=1")));
        check("http://[::1]:9/a", Some((false, "::1", 9, "[::1]:9", "/a")));
        check("http://[::1]/a", Some((false, "::1", 80, "[::1]", "/a")));
        check("http://user:pw@h/a", Some((false, "h", 80, "h", "/a")));
        check("ftp://h/a", None);
        check("http://h:port/a", None);
        check("http://[::1]x/a", None);
        check("http:///a", None);
        assert_eq!(
            Target::parse("http://u:p@h:1/")
                .unwrap()
                .userinfo
                .as_deref(),
            Some("u:p")
        );
    }

    #[test]
    fn origins_and_redirects() {
        assert_eq!(origin("http://h:1/api/v1?x"), "http://h:1");
        assert_eq!(origin("https://h"), "https://h");
        assert!(same_origin("http://H:80/a", "http://h/b"));
        assert!(same_origin("http://[::1]:8081/a", "http://[::1]:8081"));
        assert!(!same_origin("http://h:81/a", "http://h/b"));
        assert!(!same_origin("https://h/a", "http://h:443/b"));
        assert_eq!(
            resolve("http://h:1/a/b", "/c?d").as_deref(),
            Some("http://h:1/c?d")
        );
        assert_eq!(
            resolve("https://h/a", "//o/p").as_deref(),
            Some("https://o/p")
        );
        assert_eq!(
            resolve("http://h/a", "http://o/p").as_deref(),
            Some("http://o/p")
        );
        assert_eq!(resolve("http://h/a", "ftp://o/p"), None);
        assert_eq!(resolve("http://h/a", "relative"), None);
    }
}
