//! The one error type of both binaries. Every variant carries the context an
//! operator needs to act on it (the path, URL or binary name), and its message
//! reads as a sentence fragment: subject first, lowercase, expected vs actual.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong, with its context.
#[derive(Debug)]
pub enum Error {
    /// The command line was wrong; the message says how. Exit code 2.
    Usage(String),
    /// A configuration file (manifest, server config) is invalid. Exit code 2.
    Config {
        /// The file that holds the mistake.
        path: PathBuf,
        /// What is wrong and where (entry, key, line/column).
        msg: String,
    },
    /// A filesystem operation failed.
    Io {
        /// What we were doing, e.g. "renaming the new file into place".
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's answer.
        source: io::Error,
    },
    /// The HTTP exchange itself failed: connection refused, timeout, TLS, bad framing.
    Http {
        /// The URL asked for (never with credentials).
        url: String,
        /// What went wrong.
        msg: String,
    },
    /// TLS where there is none, or none where there is, or an untrusted
    /// certificate: the same every time, so never retried.
    Tls {
        /// The URL asked for.
        url: String,
        /// What is wrong and what to change.
        msg: String,
    },
    /// The server answered, but with an error status or envelope code.
    Server {
        /// The URL asked for.
        url: String,
        /// The HTTP status.
        status: i32,
        /// The server's own message, or the reason phrase.
        message: String,
    },
    /// The server asked to be left alone (`429`, or `503`): the run stops
    /// asking, and the runs after it wait until its `Retry-After` passed.
    /// An infrastructure fault: nothing held back, no build blamed.
    Busy {
        /// The URL asked for.
        url: String,
        /// The HTTP status (429 or 503).
        status: u16,
        /// Its `Retry-After` in seconds from the answer (a date already
        /// converted); `None` when it sent none or none that reads.
        retry_after: Option<u64>,
        /// The server's own message, or the reason phrase.
        message: String,
    },
    /// The server's answer could not be understood (bad JSON, missing field, bad hash).
    Protocol {
        /// The URL asked for.
        url: String,
        /// What was wrong with the answer.
        msg: String,
    },
    /// A downloaded file did not hash to what the server published.
    HashMismatch {
        /// Which hash ("md5" or "sha256").
        algo: &'static str,
        /// What the server promised.
        expected: String,
        /// What the bytes hash to.
        got: String,
    },
    /// A download was refused or cut short because of its size.
    Size {
        /// The URL downloaded.
        url: String,
        /// What went wrong: announced or grown over a limit.
        msg: String,
    },
    /// A download ended before the length its answer announced: worth
    /// another try, unlike a download that is too large.
    Truncated {
        /// The URL downloaded.
        url: String,
        /// The bytes received.
        got: u64,
        /// The bytes announced (`Content-Length`).
        len: u64,
    },
    /// A hook, restart command or supervisorctl call failed.
    Command {
        /// The command as shown to the operator: its role and the quoted
        /// command line as configured (`postUpgrade "/x --check"`), or the
        /// argument list run (`supervisorctl restart app`).
        cmd: String,
        /// Its exit status or the reason it could not run, with its output.
        msg: String,
    },
    /// supervisord cannot be asked about a service before an upgrade: it is
    /// down, or it has no such program. An infrastructure fault, never the
    /// build's: nothing is swapped and nothing held back.
    Supervisor {
        /// The status call that failed (`supervisorctl -c CONF status app`).
        cmd: String,
        /// The program asked about.
        service: String,
        /// supervisord answered, but knows no such program.
        unknown: bool,
        /// supervisorctl's last line (it names the socket it tried).
        said: String,
        /// Which supervisord was asked (`config "/etc/…"`, `server URL`).
        config: String,
    },
    /// The service did not come up as RUNNING after a restart.
    Service {
        /// The supervisor program name.
        service: String,
        /// What supervisorctl said.
        msg: String,
    },
    /// An upload's body ended early or stalled (bin-manager's publishing).
    Upload {
        /// Bytes received.
        got: u64,
        /// Bytes announced (`Content-Length`).
        len: u64,
        /// Why it stopped: `UnexpectedEof` (cut off), `TimedOut` (too slow).
        source: io::Error,
    },
    /// The server refused a request about this node (403): its node token
    /// is missing or not the one the server issued.
    NodeTokenRefused {
        /// The node name.
        node: String,
        /// The request refused and the server's message.
        msg: String,
    },
    /// A managed file sits where someone other than root or its owner could
    /// write: the agent refuses to replace it (nothing downloaded).
    UnsafePath {
        /// The file that would be replaced.
        path: PathBuf,
        /// The directory (the file's own or one above) that is not safe.
        dir: PathBuf,
        /// Who else could write it.
        why: String,
    },
    /// rename(2) cannot replace the file here: a read-only mount, or a file
    /// that is a mount point of its own.
    CannotReplace {
        /// The file.
        path: PathBuf,
        /// Its directory (the identity a failure is remembered by).
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// The managed path led to another directory at the swap than when the
    /// download started (a symlinked directory was switched mid-run).
    DirChanged {
        /// The managed path.
        path: PathBuf,
        /// Where it led when the download started (the temp file was there).
        was: PathBuf,
        /// Where it leads now.
        now: PathBuf,
    },
    /// `--every` was asked to stop (SIGTERM, SIGINT) and abandoned a step
    /// that changes nothing when abandoned (a download, before the swap).
    Stopped,
    /// A failure a caller wants to describe in its own words (rollback, lock, state).
    Other(String),
    /// bin-manager's PostgreSQL (`--database`) could not be reached or
    /// refused a statement; the message names what was being done. A write
    /// that meets it is answered 503 with Retry-After.
    Database(String),
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The process exit code this error maps to: 2 for usage and configuration
    /// mistakes (nothing was attempted), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config { .. } => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) => write!(f, "{msg} (see --help)"),
            Error::Config { path, msg } => write!(f, "\"{}\": {msg}", path.display()),
            Error::Io { what, path, source } => {
                write!(f, "{what} \"{}\": {source}", path.display())
            }
            Error::Http { url, msg } | Error::Tls { url, msg } => write!(f, "{url}: {msg}"),
            Error::Server {
                url,
                status,
                message,
            } => {
                write!(f, "{url}: server answered {status}: {message}")
            }
            Error::Busy {
                url,
                status,
                retry_after,
                message,
            } => match retry_after {
                Some(secs) => write!(
                    f,
                    "{url}: server answered {status} ({message}) and asks to retry after {secs} s"
                ),
                None => write!(
                    f,
                    "{url}: server answered {status} ({message}) without Retry-After"
                ),
            },
            Error::Protocol { url, msg } => write!(f, "{url}: unexpected answer: {msg}"),
            Error::HashMismatch {
                algo,
                expected,
                got,
            } => {
                write!(f, "{algo} mismatch: expected {expected}, got {got}")
            }
            Error::Size { url, msg } => write!(f, "{url}: {msg}"),
            Error::Truncated { url, got, len } => {
                write!(f, "{url}: truncated: got {got} of {len} bytes")
            }
            Error::Command { cmd, msg } => write!(f, "{cmd} {msg}"),
            Error::Supervisor {
                cmd,
                service,
                unknown: true,
                config,
                ..
            } => write!(
                f,
                "{cmd}: supervisord ({config}) has no program \"{service}\"; add [program:{service}] to its config and run `supervisorctl update`, or set \"service\" in the manifest"
            ),
            Error::Supervisor {
                cmd, said, config, ..
            } => write!(
                f,
                "{cmd}: supervisord did not answer ({said}; tried {config}); start it (`service supervisor start`) or point BIN_PROXY_SUPERVISORCTL at the right config"
            ),
            Error::Service { service, msg } => write!(f, "service \"{service}\": {msg}"),
            Error::Upload { got, len, source } => {
                if source.kind() == io::ErrorKind::UnexpectedEof {
                    write!(f, "upload cut short after {got} of {len} bytes")
                } else {
                    write!(f, "upload stopped after {got} of {len} bytes: {source}")
                }
            }
            Error::UnsafePath { path, dir, why } => write!(
                f,
                "\"{}\": refusing to replace it: directory \"{}\": {why}; whoever can write there could choose what root installs (make every directory up to / owned by root and not writable by group or others)",
                path.display(),
                dir.display()
            ),
            Error::CannotReplace { path, why, .. } => {
                write!(f, "\"{}\" cannot be replaced: {why}", path.display())
            }
            Error::DirChanged { path, was, now } => write!(
                f,
                "the directory of \"{}\" changed during the run: it led to \"{}\", now to \"{}\"; nothing replaced",
                path.display(),
                was.display(),
                now.display()
            ),
            Error::NodeTokenRefused { node, msg } => write!(
                f,
                "node token refused: {msg}; run `bin-manager node reset {node}` on the server if this host was rebuilt"
            ),
            Error::Stopped => f.write_str("stopping on a signal; abandoned before the swap, nothing changed"),
            Error::Other(msg) => f.write_str(msg),
            Error::Database(msg) => write!(f, "database: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::Upload { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
