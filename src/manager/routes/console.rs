//! The console: `GET /` answers one self-contained page (`console.html`:
//! HTML, CSS and a little JS, no external resource) that reads the API of
//! the server that served it. The page is a static string, so the event
//! loop answers it. It is not behind the token: it holds no data, and asks
//! for the token before it reads any.
//!
//! Its Content-Security-Policy allows exactly the page's own inline script
//! and style (by their SHA-256) and requests to this origin, nothing else:
//! markup injected by a bug could neither run a script nor send data away.

use super::fail;
use crate::hash::Sha256;
use crate::manager::http::{Payload, Response};
use std::sync::OnceLock;

/// The page.
const PAGE: &str = include_str!("../console.html");

/// `GET|HEAD /`.
pub(super) fn page(method: &str) -> Response {
    if !matches!(method, "GET" | "HEAD") {
        return fail(405, "use GET");
    }
    Response {
        status: 200,
        headers: vec![
            ("Content-Type", "text/html; charset=utf-8".into()),
            ("Cache-Control", "no-store".into()),
            ("Content-Security-Policy", policy().into()),
            ("X-Content-Type-Options", "nosniff".into()),
            ("Referrer-Policy", "no-referrer".into()),
            ("X-Frame-Options", "DENY".into()),
        ],
        body: Payload::Bytes(PAGE.as_bytes().to_vec()),
    }
}

/// The page's Content-Security-Policy, computed once.
fn policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let digest = |tag: &str| {
            let mut sha = Sha256::new();
            sha.update(inline(PAGE, tag).as_bytes());
            format!("'sha256-{}'", base64(&sha.bytes()))
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            digest("script"),
            digest("style")
        )
    })
}

/// The text of the page's one `<tag>…</tag>` element ("" when absent; the
/// unit tests make sure it is there, once).
fn inline<'p>(page: &'p str, tag: &str) -> &'p str {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    page.split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(text, _)| text)
}

/// Standard base64 with padding (what CSP hash sources are written in).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        // The CSP form of SHA-256(""), as browsers compute it.
        let sha = Sha256::new();
        assert_eq!(
            base64(&sha.bytes()),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn the_page_is_one_small_self_contained_file() {
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}>")).count(), 1, "<{tag}>");
            assert_eq!(PAGE.matches(&format!("</{tag}>")).count(), 1, "</{tag}>");
            assert!(!inline(PAGE, tag).trim().is_empty(), "{tag} is empty");
        }
        // Nothing is loaded from anywhere: no src=, href= or url(), no
        // other origin named.
        for needle in [
            " src=", "href=", "url(", "http:", "https:", "//cdn", "@import",
        ] {
            assert!(!PAGE.contains(needle), "the page contains {needle:?}");
        }
        assert!(PAGE.len() < 20 * 1024, "{} bytes", PAGE.len());
        assert!(!PAGE.contains("innerHTML"), "data goes in as text");
    }

    #[test]
    fn the_page_is_served_with_its_policy() {
        let resp = page("GET");
        let header = |k: &str| {
            resp.headers
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(resp.status, 200);
        assert_eq!(header("Content-Type"), Some("text/html; charset=utf-8"));
        assert_eq!(header("Cache-Control"), Some("no-store"));
        let csp = header("Content-Security-Policy").unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        let mut sha = Sha256::new();
        sha.update(inline(PAGE, "script").as_bytes());
        assert!(csp.contains(&base64(&sha.bytes())), "{csp}");
        assert_eq!(page("POST").status, 405);
    }
}
