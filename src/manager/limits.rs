//! What one registration may hold and how often one address may register:
//! size limits for every field of a registration (a 1 MB `osRelease` once
//! made a 313 MB fleet view), and a per-address rate limit on registering
//! new nodes, whose table of addresses has a fixed size.

use super::registry::Node;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Longest `cpuArch`, `proxyVersion`, a hash or a timestamp.
const SHORT: usize = 64;
/// Longest `osRelease`.
const OS_RELEASE: usize = 256;
/// Longest binary name or version.
const NAME: usize = 128;
/// Longest failure `error`.
const ERROR: usize = 1000;
/// Most `binaries` (and most `failures`) in one registration.
pub const MAX_BINARIES: usize = 1000;
/// Most `labels`; a label's key is at most [`SHORT`] bytes, its value [`NAME`].
const MAX_LABELS: usize = 64;

/// Checks every field of a registration against its limit; the error names
/// the field, its size and the limit.
pub fn check_registration(node: &Node) -> Result<(), String> {
    let len = |field: &str, value: &str, max: usize| {
        if value.len() > max {
            Err(format!(
                "\"{field}\" is {} bytes long, more than the limit of {max}",
                value.len()
            ))
        } else {
            Ok(())
        }
    };
    let count = |field: &str, n: usize| {
        if n > MAX_BINARIES {
            Err(format!(
                "\"{field}\" has {n} entries, more than the limit of {MAX_BINARIES}"
            ))
        } else {
            Ok(())
        }
    };
    len("name", &node.name, NAME)?;
    len("cpuArch", &node.cpu_arch, SHORT)?;
    len("osRelease", &node.os_release, OS_RELEASE)?;
    len("proxyVersion", &node.proxy_version, SHORT)?;
    count("binaries", node.binaries.len())?;
    for (i, b) in node.binaries.iter().enumerate() {
        len(&format!("binaries\"[{i}].\"name"), &b.name, NAME)?;
        len(&format!("binaries\"[{i}].\"version"), &b.version, NAME)?;
        len(&format!("binaries\"[{i}].\"hash"), &b.hash, SHORT)?;
    }
    if node.labels.len() > MAX_LABELS {
        return Err(format!(
            "\"labels\" has {} entries, more than the limit of {MAX_LABELS}",
            node.labels.len()
        ));
    }
    for (k, v) in &node.labels {
        len(
            &format!("labels\" key \"{}", crate::log::clip(k, 32)),
            k,
            SHORT,
        )?;
        len(&format!("labels\".\"{}", crate::log::clip(k, 32)), v, NAME)?;
    }
    count("failures", node.failures.len())?;
    for (i, f) in node.failures.iter().enumerate() {
        len(&format!("failures\"[{i}].\"name"), &f.name, NAME)?;
        len(&format!("failures\"[{i}].\"hash"), &f.hash, SHORT)?;
        len(&format!("failures\"[{i}].\"error"), &f.error, ERROR)?;
        len(&format!("failures\"[{i}].\"at"), &f.at, SHORT)?;
    }
    Ok(())
}

/// Addresses remembered at most; beyond, the longest-quiet one is forgotten.
const MAX_CLIENTS: usize = 4096;

/// A token bucket per client address: `per_minute` registrations at once,
/// refilled at `per_minute` a minute (or, for `maxRequestsPerClientPerSecond`,
/// `per_second` requests at once, refilled at `per_second` a second).
pub struct RateLimit {
    /// The burst (0: no limit)…
    cap: f64,
    /// …and the refill rate, tokens a second.
    per_sec: f64,
    /// Tokens left and when they were counted.
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimit {
    /// A limit of `per_minute` per address; 0 is no limit.
    pub fn new(per_minute: u32) -> RateLimit {
        RateLimit {
            cap: f64::from(per_minute),
            per_sec: f64::from(per_minute) / 60.0,
            buckets: HashMap::new(),
        }
    }

    /// A limit of `per_second` per address, a second's worth as burst; 0 is
    /// no limit.
    pub fn per_second(per_second: u32) -> RateLimit {
        RateLimit {
            cap: f64::from(per_second),
            per_sec: f64::from(per_second),
            buckets: HashMap::new(),
        }
    }

    /// Takes one registration for `client` at `now`; `Err(wait)` when its
    /// bucket is empty, with how long until the next one.
    pub fn take(&mut self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.cap <= 0.0 {
            return Ok(());
        }
        let (cap, per_sec) = (self.cap, self.per_sec);
        if !self.buckets.contains_key(&client) && self.buckets.len() >= MAX_CLIENTS {
            self.make_room(now, cap, per_sec);
        }
        let (tokens, at) = self.buckets.entry(client).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_sec).max(Duration::from_secs(1)))
        }
    }

    /// Forgets the addresses whose buckets are full again (they carry no
    /// state), or else the one quiet for longest.
    fn make_room(&mut self, now: Instant, cap: f64, per_sec: f64) {
        self.buckets.retain(|_, (tokens, at)| {
            *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < cap
        });
        if self.buckets.len() >= MAX_CLIENTS {
            let oldest = self
                .buckets
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.buckets.remove(&k);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// Longest `Retry-After` of a shed request.
const MAX_SHED_WAIT: u64 = 600;

/// The server's own load limit (`maxRequestsPerSecond`): one token bucket
/// for all clients, `per_second` requests a second with a second's worth as
/// burst. A refused request is told to come back when the requests refused
/// so far in this window could be served at the rate (`Retry-After`, 1 to
/// 600 s), so that a fleet in trouble spreads out instead of coming back
/// all at once; the agent adds its own jitter.
pub struct Shed {
    per_second: f64,
    tokens: f64,
    at: Instant,
    /// Requests refused since the last log line, and when it was written.
    refused: u64,
    logged: Option<Instant>,
    /// Requests refused since the bucket was last full.
    backlog: u64,
}

impl Shed {
    /// A limit of `per_second`; 0 is no limit.
    pub fn new(per_second: u32, now: Instant) -> Shed {
        Shed {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            at: now,
            refused: 0,
            logged: None,
            backlog: 0,
        }
    }

    /// Takes one request at `now`; `Err(seconds)` is its Retry-After. Logs
    /// at most one line a second about the requests refused.
    pub fn take(&mut self, now: Instant) -> Result<(), u64> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let cap = self.per_second;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(cap);
        self.at = now;
        if self.tokens >= cap {
            self.backlog = 0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        self.refused += 1;
        self.backlog += 1;
        if self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            crate::warn!(
                "overloaded: {} request(s) refused with 503 in the last second (maxRequestsPerSecond {})",
                self.refused,
                self.per_second
            );
            self.refused = 0;
            self.logged = Some(now);
        }
        let wait = (self.backlog as f64 / self.per_second).ceil() as u64;
        Err(wait.clamp(1, MAX_SHED_WAIT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shedding_spreads_the_backlog() {
        let t0 = Instant::now();
        let mut s = Shed::new(10, t0);
        for _ in 0..10 {
            assert_eq!(s.take(t0), Ok(()));
        }
        assert_eq!(s.take(t0), Err(1));
        for _ in 0..19 {
            let _ = s.take(t0);
        }
        assert_eq!(s.take(t0), Err(3), "21 refused at 10/s: come back in 3 s");
        // Refilled after a second: served again, the backlog forgotten.
        assert_eq!(s.take(t0 + Duration::from_secs(2)), Ok(()));
        let mut off = Shed::new(0, t0);
        assert!((0..1000).all(|_| off.take(t0).is_ok()));
    }
    use crate::protocol::{BinaryFact, FailureFact};

    fn check(edit: impl FnOnce(&mut Node), expected: Result<(), &str>) {
        let mut node = Node {
            name: "n1".into(),
            cpu_arch: "x86_64".into(),
            ..Node::default()
        };
        edit(&mut node);
        assert_eq!(check_registration(&node), expected.map_err(str::to_string));
    }

    #[test]
    fn every_field_has_a_limit_named_in_the_error() {
        check(|_| {}, Ok(()));
        check(|n| n.os_release = "x".repeat(256), Ok(()));
        check(
            |n| n.os_release = "x".repeat(1 << 20),
            Err("\"osRelease\" is 1048576 bytes long, more than the limit of 256"),
        );
        check(
            |n| n.cpu_arch = "x".repeat(65),
            Err("\"cpuArch\" is 65 bytes long, more than the limit of 64"),
        );
        check(
            |n| n.proxy_version = "x".repeat(65),
            Err("\"proxyVersion\" is 65 bytes long, more than the limit of 64"),
        );
        let bin = BinaryFact {
            name: "app".into(),
            version: "latest".into(),
            hash: String::new(),
        };
        check(|n| n.binaries = vec![bin.clone(); 1000], Ok(()));
        check(
            |n| n.binaries = vec![bin.clone(); 1001],
            Err("\"binaries\" has 1001 entries, more than the limit of 1000"),
        );
        check(
            |n| {
                n.binaries = vec![bin.clone(); 3];
                n.binaries[2].version = "v".repeat(129);
            },
            Err("\"binaries\"[2].\"version\" is 129 bytes long, more than the limit of 128"),
        );
        check(
            |n| n.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
            Err("\"labels\" has 65 entries, more than the limit of 64"),
        );
        check(
            |n| n.labels = vec![("team".into(), "v".repeat(129))],
            Err("\"labels\".\"team\" is 129 bytes long, more than the limit of 128"),
        );
        let failure = FailureFact {
            name: "app".into(),
            hash: String::new(),
            error: "e".repeat(1001),
            at: String::new(),
        };
        check(
            |n| n.failures = vec![failure],
            Err("\"failures\"[0].\"error\" is 1001 bytes long, more than the limit of 1000"),
        );
    }

    #[test]
    fn a_per_second_limit_refills_in_a_second() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut limit = RateLimit::per_second(4);
        for _ in 0..4 {
            limit.take(a, t0).unwrap();
        }
        assert_eq!(
            limit.take(a, t0),
            Err(Duration::from_secs(1)),
            "floored at 1 s"
        );
        assert_eq!(
            limit.take(a, t0 + Duration::from_millis(100)),
            Err(Duration::from_secs(1)),
            "0.4 of a token back: 150 ms to go, told 1 s"
        );
        assert!(
            limit.take(a, t0 + Duration::from_millis(300)).is_ok(),
            "refilled at 4 a second"
        );
        assert!(RateLimit::per_second(0).take(a, t0).is_ok());
    }

    #[test]
    fn registrations_are_rate_limited_per_address_in_bounded_memory() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut limit = RateLimit::new(60);
        for _ in 0..60 {
            limit.take(a, t0).unwrap();
        }
        assert_eq!(limit.take(a, t0), Err(Duration::from_secs(1)));
        assert!(
            limit.take(b, t0).is_ok(),
            "another address has its own bucket"
        );
        assert!(
            limit.take(a, t0 + Duration::from_secs(1)).is_ok(),
            "refilled"
        );
        assert!(RateLimit::new(0).take(a, t0).is_ok());

        let mut many = RateLimit::new(60);
        for i in 0..(MAX_CLIENTS as u32 * 2) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            many.take(ip, t0 + Duration::from_millis(u64::from(i)))
                .unwrap();
        }
        assert!(many.len() <= MAX_CLIENTS, "{} addresses kept", many.len());
    }
}
