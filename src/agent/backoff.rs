//! Back-off the server can steer, pure: reading `Retry-After` (seconds or an
//! HTTP date), when the next run may ask after a `429`/`503` (the server's
//! delay plus jitter, never more than a day, as Omaha clients do), and the
//! full-jitter exponential schedule of the retries inside one run. No I/O
//! and no clock: the caller passes `now` and a random number, so that every
//! branch is a one-line test.

use std::time::Duration;

/// The longest a server can make this host wait: a day. A longer
/// `Retry-After` (a misconfigured server, a date far ahead) is cut to it.
const MAX_DELAY: u64 = 86_400;
/// A `429`/`503` without a readable `Retry-After` waits this long…
const DEFAULT_DELAY: u64 = 60;
/// …plus up to this much jitter (so 60 s to 5 min).
const DEFAULT_SPREAD: u64 = 240;
/// Inside a run, a download told to retry after at most this many seconds
/// waits and retries; a longer delay ends the run (the next runs wait).
const SHORT_DELAY: u64 = 10;

/// Reads a `Retry-After` value: delay-seconds or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`), as seconds from `now`. A date in the
/// past is 0; an absurdly large number is `u64::MAX` (capped later).
/// Anything else (the obsolete RFC 850 and asctime forms included) is
/// `None`, which the caller treats as "no Retry-After".
pub fn parse_retry_after(value: &str, now: u64) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.parse().unwrap_or(u64::MAX));
    }
    parse_http_date(v).map(|t| t.saturating_sub(now))
}

/// An IMF-fixdate (RFC 9110 §5.6.7) as seconds since the epoch. The weekday
/// is not checked against the date (it carries no information).
fn parse_http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = s.as_bytes();
    let seps = [
        (3, b','),
        (4, b' '),
        (7, b' '),
        (11, b' '),
        (16, b' '),
        (19, b':'),
        (22, b':'),
    ];
    if b.len() != 29 || !s.is_ascii() || seps.iter().any(|&(i, c)| b[i] != c) || &s[25..] != " GMT"
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = &s[r];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let month = MONTHS.iter().position(|m| *m == &s[8..11])? as u32 + 1;
    let (d, y) = (num(5..7)?, num(12..16)?);
    let (h, mi, sec) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = crate::log::days_from_civil(i64::from(y), month, d);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + sec)).ok()
}

/// When the next run may ask the server, told `retry_after` seconds (`None`:
/// no Retry-After) at `now`: the delay plus jitter of up to half of it (at
/// least a second), so a fleet told the same delay does not come back in
/// the same second — and never more than [`MAX_DELAY`] after `now`.
pub fn not_before(now: u64, retry_after: Option<u64>, random: u64) -> u64 {
    let (delay, spread) = match retry_after {
        Some(secs) => {
            let secs = secs.min(MAX_DELAY);
            (secs, (secs / 2).max(1))
        }
        None => (DEFAULT_DELAY, DEFAULT_SPREAD),
    };
    now.saturating_add((delay + random % (spread + 1)).min(MAX_DELAY))
}

/// Full jitter (the AWS architecture blog's name): a wait drawn uniformly
/// from `0..=min(cap, base·2^attempt)`, in milliseconds.
fn full_jitter(attempt: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    let ceiling = base.saturating_mul(factor).min(cap);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random % ms.saturating_add(1))
}

/// How often and how long a run retries one transient failure: at most
/// `attempts` tries, waits from [`full_jitter`], all waits together at most
/// `budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retries {
    /// Tries in all (the first one included).
    pub attempts: u32,
    /// The first retry waits up to this…
    pub base: Duration,
    /// …doubling up to this.
    pub cap: Duration,
    /// The waits of one request add up to at most this.
    pub budget: Duration,
}

impl Retries {
    /// The wait before the next try, after try `attempt` (1 = the first)
    /// failed and `waited` was spent waiting already; `retry_after` is the
    /// server's own delay, which the wait is never shorter than. `None`:
    /// give up (tries or budget used up, or the server's delay is not short).
    pub fn wait(
        &self,
        attempt: u32,
        waited: Duration,
        retry_after: Option<u64>,
        random: u64,
    ) -> Option<Duration> {
        if attempt >= self.attempts || retry_after.is_some_and(|s| s > SHORT_DELAY) {
            return None;
        }
        let jitter = full_jitter(attempt - 1, self.base, self.cap, random);
        let wait = jitter.max(Duration::from_secs(retry_after.unwrap_or(0)));
        (waited + wait <= self.budget).then_some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_507_201; // Tue, 24 Nov 2026 08:00:01 GMT

    fn check_after(value: &str, expected: Option<u64>) {
        assert_eq!(parse_retry_after(value, NOW), expected, "{value:?}");
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        check_after("120", Some(120));
        check_after(" 0 ", Some(0));
        check_after("99999999999999999999999", Some(u64::MAX));
        check_after("Tue, 24 Nov 2026 08:02:01 GMT", Some(120));
        check_after("Tue, 24 Nov 2026 08:00:01 GMT", Some(0));
        check_after("Mon, 23 Nov 2026 08:00:01 GMT", Some(0)); // past: now
        check_after("Thu, 03 Dec 2026 08:00:01 GMT", Some(9 * 86_400));
        for bad in ["", "  ", "-1", "1.5", "soon", "120s"] {
            check_after(bad, None);
        }
    }

    #[test]
    fn http_dates_are_read_strictly() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400)
        );
        assert_eq!(
            parse_http_date("Sun, 28 Feb 2100 23:59:59 GMT"),
            Some(4_107_542_399)
        );
        assert_eq!(
            parse_http_date("Wed, 31 Dec 2025 23:59:60 GMT"),
            Some(1_767_225_600)
        );
        for bad in [
            "Tue, 24 Nov 2026 08:00:01 UTC",
            "Tue, 24 Nov 2026 08:00:01 GMT ",
            "Tue 24 Nov 2026 08:00:01 GMT ",
            "Tue,_24 Nov 2026 08:00:01 GMT",
            "Tue, 24-Nov 2026 08:00:01 GMT",
            "Tue, 24 Nov-2026 08:00:01 GMT",
            "Tue, 24 Nov 2026-08:00:01 GMT",
            "Tue, 24 Nov 2026 08-00:01 GMT",
            "Tue, 24 Nov 2026 08:00-01 GMT",
            "Tue, 24 Nob 2026 08:00:01 GMT",
            "Tue, 00 Nov 2026 08:00:01 GMT",
            "Tue, 32 Nov 2026 08:00:01 GMT",
            "Tue, 24 Nov 2026 24:00:01 GMT",
            "Tue, 24 Nov 2026 08:60:01 GMT",
            "Tue, 24 Nov 2026 08:00:61 GMT",
            "Tue, 2a Nov 2026 08:00:01 GMT",
            "Tue, +4 Nov 2026 08:00:01 GMT",
            "Tuesday, 24-Nov-26 08:00:01 GMT",
            "Tue Nov 24 08:00:01 2026",
            "Tue, 24 Nov 2026 08:00:0éGMT", // 29 bytes, not ASCII: no slicing inside a char
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
        // Every month by name (1970: not a leap year).
        let firsts = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        for (m, day) in months.iter().zip(firsts) {
            let date = format!("Thu, 01 {m} 1970 00:00:00 GMT");
            assert_eq!(parse_http_date(&date), Some(day * 86_400), "{date}");
        }
    }

    #[test]
    fn the_next_run_waits_the_delay_plus_jitter_at_most_a_day() {
        // Jitter: up to half the delay, at least a second.
        assert_eq!(not_before(NOW, Some(30), 0), NOW + 30);
        assert_eq!(not_before(NOW, Some(30), 15), NOW + 45);
        assert_eq!(
            not_before(NOW, Some(30), 16),
            NOW + 30,
            "wraps within 0..=15"
        );
        assert_eq!(not_before(NOW, Some(0), 1), NOW + 1);
        assert_eq!(not_before(NOW, Some(0), 2), NOW);
        assert_eq!(not_before(NOW, Some(1), 1), NOW + 2);
        assert_eq!(not_before(NOW, Some(3), 1), NOW + 4);
        assert_eq!(not_before(NOW, Some(3), 2), NOW + 3);
        // Never more than a day, whatever the server said or the dice.
        assert_eq!(not_before(NOW, Some(10 * 86_400), 0), NOW + MAX_DELAY);
        assert_eq!(not_before(NOW, Some(u64::MAX), 0), NOW + MAX_DELAY);
        assert_eq!(
            not_before(NOW, Some(u64::MAX), 5),
            NOW + MAX_DELAY,
            "no overflow"
        );
        assert_eq!(not_before(NOW, Some(86_000), 1000), NOW + MAX_DELAY);
        assert_eq!(not_before(NOW, Some(86_000), 399), NOW + 86_399);
        assert_eq!(not_before(u64::MAX, Some(5), 0), u64::MAX);
        // No Retry-After: 60 s to 5 min.
        assert_eq!(not_before(NOW, None, 0), NOW + 60);
        assert_eq!(not_before(NOW, None, 240), NOW + 300);
        assert_eq!(not_before(NOW, None, 241), NOW + 60);
    }

    #[test]
    fn full_jitter_draws_below_a_doubling_capped_ceiling() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(4));
        let ms = Duration::from_millis;
        assert_eq!(full_jitter(0, base, cap, 500), ms(500));
        assert_eq!(full_jitter(0, base, cap, 501), ms(0));
        assert_eq!(full_jitter(1, base, cap, 1000), ms(1000));
        assert_eq!(full_jitter(1, base, cap, 1001), ms(0));
        assert_eq!(full_jitter(2, base, cap, 2000), ms(2000));
        assert_eq!(full_jitter(3, base, cap, 4000), ms(4000));
        assert_eq!(full_jitter(4, base, cap, 4001), ms(0), "capped at 4 s");
        assert_eq!(full_jitter(40, base, cap, 3999), ms(3999));
        assert_eq!(full_jitter(7, base, cap, 12_345), ms(12_345 % 4001));
        assert_eq!(full_jitter(0, Duration::ZERO, cap, 7), ms(0));
        assert_eq!(
            full_jitter(0, Duration::MAX, Duration::MAX, 7),
            ms(7),
            "no overflow"
        );
    }

    #[test]
    fn retries_are_bounded_in_count_and_total_wait() {
        let r = Retries {
            attempts: 3,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(8),
            budget: Duration::from_secs(5),
        };
        let ms = Duration::from_millis;
        assert_eq!(r.wait(1, ms(0), None, 1000), Some(ms(1000)));
        assert_eq!(r.wait(1, ms(0), None, 1001), Some(ms(0)));
        assert_eq!(r.wait(2, ms(1000), None, 2000), Some(ms(2000)));
        assert_eq!(r.wait(3, ms(0), None, 0), None, "three tries in all");
        // The budget: waits add up to at most 5 s.
        assert_eq!(r.wait(2, ms(3000), None, 2000), Some(ms(2000)));
        assert_eq!(r.wait(2, ms(3001), None, 2000), None);
        // The server's short delay is a floor; a longer one ends the retries.
        assert_eq!(r.wait(1, ms(0), Some(2), 5), Some(ms(2000)));
        assert_eq!(r.wait(1, ms(0), Some(0), 5), Some(ms(5)));
        assert_eq!(r.wait(1, ms(0), Some(5), 5), Some(ms(5000)));
        assert_eq!(r.wait(1, ms(1), Some(5), 5), None, "over the budget");
        let long = Retries {
            budget: Duration::from_secs(60),
            ..r
        };
        assert_eq!(long.wait(1, ms(0), Some(SHORT_DELAY), 0), Some(ms(10_000)));
        assert_eq!(long.wait(1, ms(0), Some(SHORT_DELAY + 1), 0), None);
    }
}
