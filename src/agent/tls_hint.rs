//! The mistake a retry cannot fix: a TLS client talking to a plain-HTTP port
//! (`https://` for bin-manager's own listener), or a plain client talking to
//! a TLS port, or a certificate this host does not trust. [`classify`] turns
//! such an error into [`Error::Tls`], which says what to change and is never
//! retried. The HTTP client's errors arrive as text here (httparse and rustls
//! report these cases only in their messages), so this is the one place that
//! reads them; everything after it decides on the typed variant.

use crate::error::Error;

/// `e`, or the [`Error::Tls`] it really is.
pub fn classify(e: Error) -> Error {
    let (url, said) = match &e {
        Error::Http { url, msg } | Error::Protocol { url, msg } => (url, msg.as_str()),
        Error::Server { url, message, .. } => (url, message.as_str()),
        _ => return e,
    };
    let at = authority(url);
    let msg = if url.starts_with("https://") {
        if said.contains("invalid peer certificate") {
            // client.rs already added where the CA must be.
            said.to_string()
        } else if said.contains("corrupt message") || said.contains("InvalidContentType") {
            format!("{at} did not answer TLS — is the URL http://? ({said})")
        } else {
            return e;
        }
    } else if said.contains("did not provide a status line")
        || said.contains("plain HTTP request was sent to HTTPS port")
        || said.contains("invalid HTTP version")
    {
        format!("{at} answered in TLS, not plain HTTP — is the URL https://? ({said})")
    } else {
        return e;
    };
    Error::Tls {
        url: url.clone(),
        msg,
    }
}

/// `host:port` of a URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: Error, expected: Option<&str>) {
        let got = classify(e);
        match (got, expected) {
            (Error::Tls { msg, .. }, Some(want)) => assert!(msg.starts_with(want), "{msg}"),
            (other, None) => assert!(!matches!(other, Error::Tls { .. }), "{other}"),
            (other, Some(want)) => panic!("{other} is not {want}"),
        }
    }

    #[test]
    fn mismatches_are_recognised() {
        let http = |url: &str, msg: &str| Error::Http {
            url: url.into(),
            msg: msg.into(),
        };
        check(
            http(
                "https://127.0.0.1:8081/api/v1/bins/a",
                "received corrupt message of type InvalidContentType",
            ),
            Some("127.0.0.1:8081 did not answer TLS — is the URL http://?"),
        );
        check(
            Error::Server {
                url: "http://h:8443/api/v1/bins/a".into(),
                status: 503,
                message: "Server did not provide a status line".into(),
            },
            Some("h:8443 answered in TLS, not plain HTTP — is the URL https://?"),
        );
        check(
            http(
                "https://h/x",
                "invalid peer certificate: UnknownIssuer (is the server's CA …?)",
            ),
            Some("invalid peer certificate"),
        );
        check(http("http://h/x", "connection refused"), None);
        check(http("https://h/x", "no answer within 30 s"), None);
    }
}
