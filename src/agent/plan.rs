//! The decision for one binary, from facts already gathered: the hash the
//! manifest recorded, the hash of the file on disk, the hash the server
//! publishes, and whether that build is held back here (it failed here before). No I/O, so every
//! case is a one-line test.

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
