//! The decision for one binary, from facts already gathered: the hash the
//! manifest recorded, the hash of the file on disk, the hash the server
//! publishes, and whether that build is held back here (it failed here before). No I/O, so every
//! case is a one-line test. Also whether a failed download is worth another try.

use crate::error::Error;
use crate::hash::same;

/// Why a binary needs installing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Never installed here: no recorded hash, no file.
    Fresh,
    /// Recorded as installed, but the file is gone.
    Missing,
    /// The file on disk is not what was installed (edited, replaced, damaged).
    Changed,
    /// The server publishes a different build.
    Outdated,
}

impl Reason {
    /// How the reason reads in a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Fresh => "not installed yet",
            Reason::Missing => "file is missing",
            Reason::Changed => "file changed on disk since it was installed",
            Reason::Outdated => "new build published",
        }
    }
}

/// What to do with one binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The file on disk is the published build. `record` says the manifest's
    /// hash is stale and should be rewritten (and reported).
    UpToDate {
        /// Whether the manifest needs the new hash.
        record: bool,
    },
    /// Download and install the published build.
    Install(Reason),
    /// The published build failed here before; wait for a different one.
    HeldBack,
}

/// Decides what to do. `actual` is `None` when the file does not exist.
pub fn decide(recorded: &str, actual: Option<&str>, remote: &str, held_back: bool) -> Action {
    if let Some(actual) = actual.filter(|a| same(a, remote)) {
        if held_back && !same(recorded, actual) {
            // The failed build is on disk because it could not be rolled
            // back: never record or report it as installed.
            return Action::HeldBack;
        }
        return Action::UpToDate {
            record: !same(recorded, actual),
        };
    }
    if held_back {
        return Action::HeldBack;
    }
    Action::Install(match actual {
        None if recorded.is_empty() => Reason::Fresh,
        None => Reason::Missing,
        Some(a) if !recorded.is_empty() && !same(a, recorded) => Reason::Changed,
        Some(_) => Reason::Outdated,
    })
}

/// When the state does not know the file on disk as it is now (first run,
/// a touched file), whether to install without reading it first — hashing
/// it while the new build downloads: `Some(reason)` when an upgrade is due
/// anyway (the manifest records a build other than the published one, and
/// none is held back or blocked here), so the wait for a whole read of the
/// old file changes nothing. `None`: read it first (it may well be the
/// published build: then nothing is downloaded).
pub fn install_while_hashing(recorded: &str, remote: &str, held: bool) -> Option<Reason> {
    (!held && !recorded.is_empty() && !same(recorded, remote)).then_some(Reason::Outdated)
}

/// After a download begun by [`install_while_hashing`], with the old
/// file's hash `actual` read meanwhile: why the download replaces it, or
/// `None` when the file already was the published build (the download is
/// dropped, the manifest records the build).
pub fn replaced(recorded: &str, actual: &str, remote: &str) -> Option<Reason> {
    match decide(recorded, Some(actual), remote, false) {
        Action::Install(reason) => Some(reason),
        Action::UpToDate { .. } | Action::HeldBack => None,
    }
}

/// Whether a download that failed with `e` is worth another try: the
/// network or the server may recover (a 5xx, 429, a connection cut short);
/// a wrong hash, a size over a limit or a 4xx will not.
pub fn worth_retry(e: &Error) -> bool {
    match e {
        Error::Http { .. } | Error::Truncated { .. } | Error::Busy { .. } => true,
        Error::Server { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        recorded: &str,
        actual: Option<&str>,
        remote: &str,
        held_back: bool,
        expected: Action,
    ) {
        assert_eq!(
            decide(recorded, actual, remote, held_back),
            expected,
            "{recorded:?} {actual:?} {remote:?} {held_back}"
        );
    }

    #[test]
    fn decisions() {
        use Action::*;
        check("aa", Some("aa"), "aa", false, UpToDate { record: false });
        check("aa", Some("AA"), "aA", false, UpToDate { record: false });
        check("", Some("bb"), "bb", false, UpToDate { record: true });
        check("aa", Some("bb"), "bb", false, UpToDate { record: true });
        check("aa", Some("bb"), "bb", true, HeldBack);
        check("bb", Some("bb"), "bb", true, UpToDate { record: false });
        check("", None, "bb", false, Install(Reason::Fresh));
        check("aa", None, "bb", false, Install(Reason::Missing));
        check("aa", None, "aa", false, Install(Reason::Missing));
        check("aa", Some("cc"), "aa", false, Install(Reason::Changed));
        check("aa", Some("cc"), "bb", false, Install(Reason::Changed));
        check("aa", Some("aa"), "bb", false, Install(Reason::Outdated));
        check("", Some("cc"), "bb", false, Install(Reason::Outdated));
        check("aa", Some("aa"), "bb", true, HeldBack);
        check("", None, "bb", true, HeldBack);
    }

    #[test]
    fn hashing_meanwhile() {
        assert_eq!(
            install_while_hashing("aa", "bb", false),
            Some(Reason::Outdated)
        );
        assert_eq!(install_while_hashing("aa", "bb", true), None);
        assert_eq!(install_while_hashing("aa", "AA", false), None);
        assert_eq!(install_while_hashing("", "bb", false), None);
        assert_eq!(replaced("aa", "aa", "bb"), Some(Reason::Outdated));
        assert_eq!(replaced("aa", "cc", "bb"), Some(Reason::Changed));
        assert_eq!(replaced("aa", "BB", "bb"), None);
    }

    #[test]
    fn retries() {
        let server = |status| Error::Server {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        let http = Error::Http {
            url: "u".into(),
            msg: "connection refused".into(),
        };
        let cut = Error::Truncated {
            url: "u".into(),
            got: 1,
            len: 2,
        };
        let big = Error::Size {
            url: "u".into(),
            msg: "body exceeds the limit of 1 KiB".into(),
        };
        let wrong = Error::HashMismatch {
            algo: "md5",
            expected: "aa".into(),
            got: "bb".into(),
        };
        for (e, expected) in [
            (http, true),
            (cut, true),
            (server(500), true),
            (server(503), true),
            (server(429), true),
            (
                Error::Busy {
                    url: "u".into(),
                    status: 503,
                    retry_after: Some(5),
                    message: "busy".into(),
                },
                true,
            ),
            (server(499), false),
            (server(428), false),
            (server(430), false),
            (server(404), false),
            (big, false),
            (wrong, false),
            (Error::Other("x".into()), false),
        ] {
            assert_eq!(worth_retry(&e), expected, "{e}");
        }
    }

    #[test]
    fn reasons_read_as_the_log_says() {
        // How "app: …; installing OLD→NEW from URL" starts in the log.
        let words = [
            Reason::Fresh,
            Reason::Missing,
            Reason::Changed,
            Reason::Outdated,
        ]
        .map(Reason::describe);
        assert_eq!(
            words,
            [
                "not installed yet",
                "file is missing",
                "file changed on disk since it was installed",
                "new build published",
            ]
        );
    }
}
