//! Log lines on stderr — a cron job's only voice. One event per line:
//! `2026-11-24T08:00:01Z INFO myapp: upgraded 1f3a2b4c…→9c0d1e2f… (12.4 MiB, 48.0 MiB/s)`,
//! or with `--log-format json` one object per line for log shippers:
//! `{"ts":"…","level":"info","binary":"myapp","event":"upgraded","from":"<md5>","to":"<md5>","msg":"upgraded …"}`.
//! An [`Event`] carries the structure (binary, what happened, hashes) that
//! the text format renders as the familiar `myapp: …` prefix.
//! Also the small formatters every message uses: UTC timestamps, sizes,
//! rates and shortened hashes.
//!
//! Nothing from outside can forge a line: every message and binary name is
//! passed through [`escape`] as it is written, in both formats, so a
//! server's message, a header, a command's output or a file name holding a
//! newline, a carriage return or a terminal escape sequence shows up as
//! `\n`, `\r`, `\x1b` — text, on the one line of the event it belongs to.
//! (Our own messages contain no control characters.) Where such strings
//! are quoted, [`clip`] caps their length.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much to say.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Level {
    /// Failures only.
    Error = 0,
    /// Failures and warnings.
    Warn = 1,
    /// Every change (the default).
    Info = 2,
    /// Every request and decision.
    Debug = 3,
}

/// How lines are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// `TIME LEVEL [binary: ]message` (the default).
    Text = 0,
    /// One JSON object per line: ts, level, binary, event, from, to, msg.
    Json = 1,
}

static MAX: AtomicU8 = AtomicU8::new(Level::Info as u8);
static FORMAT: AtomicU8 = AtomicU8::new(Format::Text as u8);

/// Sets the most detailed level that is printed.
pub fn set_level(level: Level) {
    MAX.store(level as u8, Ordering::Relaxed);
}

/// Sets the line format.
pub fn set_format(format: Format) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

/// Whether a line at `level` would be printed.
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX.load(Ordering::Relaxed)
}

/// What a log line is about, beyond its message: the binary, what happened
/// to it (the JSON `event`, a stable snake_case word), and the hashes it
/// went from and to. Lines about no binary in particular use
/// [`Event::run`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Event<'a> {
    /// The managed binary's name.
    pub binary: Option<&'a str>,
    /// What happened: `upgraded`, `rolled_back`, `held_back`, `failed`, …
    pub event: Option<&'static str>,
    /// The md5 it went from ("" = none).
    pub from: Option<&'a str>,
    /// The md5 it went (or would go) to.
    pub to: Option<&'a str>,
}

impl<'a> Event<'a> {
    /// Something that happened to `binary`.
    pub fn new(binary: &'a str, event: &'static str) -> Event<'a> {
        Event {
            binary: Some(binary),
            event: Some(event),
            ..Event::default()
        }
    }

    /// Something about the whole run (no binary).
    pub fn run(event: &'static str) -> Event<'a> {
        Event {
            event: Some(event),
            ..Event::default()
        }
    }

    /// With the hashes it went from and to.
    pub fn hashes(self, from: &'a str, to: &'a str) -> Event<'a> {
        Event {
            from: Some(from),
            to: Some(to),
            ..self
        }
    }

    /// Writes it at `level` (use the [`event!`](crate::event) macro).
    pub fn log(&self, level: Level, msg: fmt::Arguments<'_>) {
        if enabled(level) {
            let json = FORMAT.load(Ordering::Relaxed) == Format::Json as u8;
            let format = if json { Format::Json } else { Format::Text };
            emit(&render(self, level, &utc_now(), msg, format));
        }
    }
}

/// Writes one plain line at `level` (use the macros).
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    Event::default().log(level, args);
}

/// The line for an event, with its final newline, in the current format.
fn render(
    ev: &Event<'_>,
    level: Level,
    ts: &str,
    msg: fmt::Arguments<'_>,
    format: Format,
) -> String {
    let msg = msg.to_string();
    if format == Format::Json {
        return json_line(ev, level, ts, &msg);
    }
    let tag = match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
    };
    let mut line = format!("{ts} {tag} ");
    if let Some(bin) = ev.binary {
        line.push_str(&escape(bin));
        line.push_str(": ");
    }
    line.push_str(&escape(&msg));
    line.push('\n');
    line
}

fn json_line(ev: &Event<'_>, level: Level, ts: &str, msg: &str) -> String {
    use crate::json::Value;
    let opt = |v: Option<&str>| v.map_or(Value::Null, Value::str);
    let level = match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    };
    let mut line = Value::obj([
        ("ts", Value::str(ts)),
        ("level", Value::str(level)),
        ("binary", opt(ev.binary)),
        ("event", opt(ev.event)),
        ("from", opt(ev.from)),
        ("to", opt(ev.to)),
        ("msg", Value::str(msg)),
    ])
    .to_compact();
    line.push('\n');
    line
}

/// `s` with every character that could change what a log reader (or a
/// terminal) sees written as text: C0 controls and DEL as `\n`, `\r`, `\t`
/// or `\xNN`; C1 controls, the Unicode line and paragraph separators and the
/// bidirectional overrides and isolates (which reorder what a terminal
/// shows) as `\u{NNNN}`. Everything else is kept, backslashes included.
/// Borrowed when there is nothing to escape (the usual case).
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && needs(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if needs(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` characters, with `…` when something was cut:
/// the cap for a string from outside (a server's message, a header) quoted
/// in a message.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((end, _)) => Cow::Owned(format!("{}…", &s[..end])),
    }
}

/// One write per line so that lines of concurrent runs do not interleave.
fn emit(line: &str) {
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs an [`Event`]: `event!(Info, Event::new("myapp", "upgraded").hashes(a, b), "upgraded {}", x)`.
#[macro_export]
macro_rules! event { ($level:ident, $ev:expr, $($t:tt)*) => { $ev.log($crate::log::Level::$level, format_args!($($t)*)) } }

/// Logs at error level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) } }
/// Logs at warning level.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) } }
/// Logs at info level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) } }
/// Logs at debug level (`--verbose`).
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) } }

/// The current time as RFC 3339 UTC with second precision: `2026-11-24T08:00:01Z`.
pub fn utc_now() -> String {
    rfc3339(SystemTime::now())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats a time as RFC 3339 UTC with second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Formats a time as an HTTP date (RFC 9110 IMF-fixdate):
/// `Tue, 24 Nov 2026 08:00:01 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize], // 1970-01-01 was a Thursday
        MONTHS[(m as usize).clamp(1, 12) - 1],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Reads an RFC 3339 time in UTC as written by [`rfc3339`]
/// (`2026-11-24T08:00:01Z`; fractional seconds are ignored): seconds since
/// the epoch, or `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if b.len() < 20 || seps.iter().any(|&(i, c)| !b[i].eq_ignore_ascii_case(&c)) {
        return None;
    }
    let tail = &s[19..];
    let tail = match tail.strip_prefix('.') {
        Some(frac) => frac.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => tail,
    };
    if !tail.eq_ignore_ascii_case("z") {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
    u64::try_from(secs).ok()
}

/// (year, month, day) to days since 1970-01-01 (the inverse of
/// [`civil_from_days`]).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A byte count for people: `512 B`, `12.4 KiB`, `1.0 GiB`. Integer
/// arithmetic only (the agent carries no float formatting code).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 1;
    while unit < UNITS.len() - 1 && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let div = 1u128 << (10 * unit);
    let tenths = (u128::from(bytes) * 10 + div / 2) / div;
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

/// A transfer rate for people: `48.0 MiB/s`.
pub fn rate(bytes: u64, elapsed: Duration) -> String {
    let micros = elapsed.as_micros().max(1);
    let per_sec = u128::from(bytes) * 1_000_000 / micros;
    format!("{}/s", size(per_sec.min(u128::from(u64::MAX)) as u64))
}

/// A hash shortened for log lines: the first 8 hex digits and an ellipsis;
/// `none` for an empty one.
pub fn short(hash: &str) -> String {
    match hash.get(..8) {
        Some(head) if hash.len() > 8 => format!("{head}…"),
        _ if hash.is_empty() => "none".to_string(),
        _ => hash.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_time(secs: u64, expected: &str) {
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), expected);
    }

    #[test]
    fn timestamps() {
        check_time(0, "1970-01-01T00:00:00Z");
        check_time(951_782_400, "2000-02-29T00:00:00Z");
        check_time(1_795_507_201, "2026-11-24T08:00:01Z");
        check_time(4_107_542_399, "2100-02-28T23:59:59Z");
        let http = |secs| http_date(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(http(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http(1_795_507_201), "Tue, 24 Nov 2026 08:00:01 GMT");
        assert_eq!(http(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 GMT");
    }

    #[test]
    fn timestamps_read_back() {
        for secs in [0, 951_782_400, 1_795_507_201, 4_107_542_399, 1_709_164_800] {
            let text = rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(parse_rfc3339(&text), Some(secs), "{text}");
        }
        assert_eq!(
            parse_rfc3339("2026-11-24T08:00:01.250Z"),
            Some(1_795_507_201)
        );
        assert_eq!(parse_rfc3339("2026-11-24t08:00:01z"), Some(1_795_507_201));
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24T08:00:01",
            "2026-11-24T08:00:01+01:00",
            "2026-13-24T08:00:01Z",
            "2026-11-24T24:00:01Z",
            "2026-11-24 08:00:01Z",
            "2026-1a-24T08:00:01Z",
            "+026-11-24T08:00:01Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn check_escape(raw: &str, shown: &str) {
        assert_eq!(escape(raw), shown, "{raw:?}");
    }

    #[test]
    fn outside_text_cannot_forge_lines_or_drive_a_terminal() {
        check_escape(
            "plain text, ünïcode → ok \\n",
            "plain text, ünïcode → ok \\n",
        );
        check_escape(
            "x\n2026-11-24T08:00:01Z INFO myapp: upgraded",
            "x\\n2026-11-24T08:00:01Z INFO myapp: upgraded",
        );
        check_escape("a\rb\tc", "a\\rb\\tc");
        check_escape("\x1b[2K\x1b]0;title\x07", "\\x1b[2K\\x1b]0;title\\x07");
        check_escape("\0\x7f", "\\x00\\x7f");
        check_escape("\u{9b}31m", "\\u{009b}31m");
        check_escape("abc\u{202e}fed\u{2028}", "abc\\u{202e}fed\\u{2028}");
        assert!(matches!(escape("nothing to do"), Cow::Borrowed(_)));
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("ééé", 2), "éé…");
    }

    fn line(ev: Event<'_>, format: Format, msg: &str) -> String {
        render(
            &ev,
            Level::Info,
            "2026-11-24T08:00:01Z",
            format_args!("{msg}"),
            format,
        )
    }

    #[test]
    fn events_render_as_text_and_json() {
        let ev = Event::new("myapp", "upgraded").hashes("aa", "bb");
        assert_eq!(
            line(ev, Format::Text, "upgraded aa→bb"),
            "2026-11-24T08:00:01Z INFO myapp: upgraded aa→bb\n"
        );
        assert_eq!(
            line(ev, Format::Json, "upgraded aa→bb"),
            "{\"ts\":\"2026-11-24T08:00:01Z\",\"level\":\"info\",\"binary\":\"myapp\",\"event\":\"upgraded\",\"from\":\"aa\",\"to\":\"bb\",\"msg\":\"upgraded aa→bb\"}\n"
        );
        assert_eq!(
            line(Event::default(), Format::Json, "hi"),
            "{\"ts\":\"2026-11-24T08:00:01Z\",\"level\":\"info\",\"binary\":null,\"event\":null,\"from\":null,\"to\":null,\"msg\":\"hi\"}\n"
        );
    }

    #[test]
    fn control_characters_never_break_a_line() {
        let hostile = "bad\nFAKE LINE\x1b[31m\tend\u{7f}";
        assert_eq!(
            line(Event::new("a\nb", "failed"), Format::Text, hostile),
            "2026-11-24T08:00:01Z INFO a\\nb: bad\\nFAKE LINE\\x1b[31m\\tend\\x7f\n"
        );
        let json = line(Event::default(), Format::Json, hostile);
        assert_eq!(json.matches('\n').count(), 1, "{json}");
        assert!(json.contains("bad\\nFAKE LINE\\u001b[31m\\tend"), "{json}");
    }

    #[test]
    fn sizes_and_hashes() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(13_002_342), "12.4 MiB");
        assert_eq!(size(1 << 30), "1.0 GiB");
        assert_eq!(size((1 << 30) - 1), "1024.0 MiB");
        assert_eq!(size(5 << 40), "5.0 TiB");
        assert_eq!(size(u64::MAX), "16777216.0 TiB");
        assert_eq!(rate(48 << 20, Duration::from_secs(1)), "48.0 MiB/s");
        assert_eq!(short("1f3a2b4c5d6e7f8091a2b3c4d5e6f708"), "1f3a2b4c…");
        assert_eq!(short(""), "none");
    }

    #[test]
    fn the_level_filters_what_is_printed() {
        // The only unit test that changes the global level; it restores the
        // default before it ends.
        let all = [Level::Error, Level::Warn, Level::Info, Level::Debug];
        let shown = || {
            all.iter()
                .filter(|l| enabled(**l))
                .copied()
                .collect::<Vec<_>>()
        };
        set_level(Level::Warn);
        assert_eq!(shown(), [Level::Error, Level::Warn]);
        set_level(Level::Error);
        assert_eq!(shown(), [Level::Error]);
        set_level(Level::Debug);
        assert_eq!(shown(), all);
        set_level(Level::Info);
        assert_eq!(shown(), [Level::Error, Level::Warn, Level::Info]);
    }
}
