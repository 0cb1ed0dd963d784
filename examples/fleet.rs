//! Fleet simulation for bin-manager (run by `scripts/bench/server.sh`).
//!
//! N simulated nodes with B binaries each check in once per round (a round
//! is `--window` seconds, like cron's minute). Each node starts at a fixed
//! per-node offset in 0..=window whole seconds, computed exactly as
//! `bin-proxy --splay WINDOW` does, and does what an idle agent run does:
//! `GET keepalive?node=NODE&arch=ARCH` (a `POST` registration with its B
//! binaries when that is a 404), then `GET bins/NAME?arch=ARCH` for each of
//! its binaries. Every request is on a new TCP connection with
//! `Connection: close`, read to EOF (so the server closes first and keeps the
//! TIME_WAIT), as the agent's HTTP client does.
//!
//! A fixed pool of threads takes node runs in order of due time. Everything
//! is bounded: each request by `--timeout`, the whole simulation by the last
//! due time plus `--grace` (runs not started by then are counted as skipped,
//! runs still going stop between requests).
//!
//! With `--mode check`, a node's run is instead what an agent that speaks
//! the batched check sends: one `POST check` naming its B binaries with the
//! ETag of its last answer in `If-None-Match` (idle: a `304`), and a `POST
//! keepalive` registration when the answer says `registered: false`.
//!
//! With `--server-pid`, a sampler reads the server's `/proc` files every
//! 100 ms: CPU time (utime+stime), disk writes, peak RSS and the state of
//! each thread (with its kernel wait channel); with `--state-file` it also
//! watches the registry's snapshot (a new inode = the whole state rewritten)
//! and its log. Prints Markdown tables on stdout. Uses std only (and this
//! crate's md5, for the splay).
//!
//! With `--bad-hash MD5 --bad-bin NAME` it simulates a bad build in a
//! staged rollout: every node whose `bins/NAME?node=` answer names that md5
//! "installs" it, fails, and reports the failure in its next keepalive (as
//! a real agent does after its rollback); a watcher polls
//! `GET rollouts/NAME` and the report says how many nodes ever received the
//! build and how long the rollout took to halt.
//!
//! ```text
//! cargo run --release --example fleet -- --addr 127.0.0.1:8081 --nodes 10000 \
//!     --bins 50 --window 60 --rounds 2 --threads 64 --server-pid PID --state-file PATH
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest response accepted.
const MAX_RESPONSE: usize = 1 << 20;
/// Sampling interval of the server's /proc files.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Opts {
    addr: SocketAddr,
    nodes: usize,
    bins: usize,
    window: u64,
    rounds: usize,
    threads: usize,
    arch: String,
    node_prefix: String,
    bin_prefix: String,
    timeout: Duration,
    grace: Duration,
    server_pid: Option<u32>,
    state_file: Option<PathBuf>,
    clk_tck: u64,
    /// A build that fails on every node that installs it (rollout mode).
    bad_hash: Option<String>,
    /// The binary it is published as.
    bad_bin: String,
    /// `POST check` instead of keepalive + bins/NAME.
    check: bool,
}

const USAGE: &str =
    "usage: fleet --addr IP:PORT [--nodes N] [--bins B] [--window SECS] [--rounds R]
             [--threads T] [--arch ARCH] [--node-prefix P] [--bin-prefix P]
             [--timeout SECS] [--grace SECS] [--server-pid PID] [--state-file PATH]
             [--clk-tck HZ] [--bad-hash MD5 --bad-bin NAME] [--mode bins|check]
Binaries are named BIN_PREFIX000 .. (three digits); they must be published.";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        addr: "127.0.0.1:8081".parse().expect("literal address"),
        nodes: 10_000,
        bins: 50,
        window: 60,
        rounds: 1,
        threads: 64,
        arch: "x86_64".into(),
        node_prefix: "fleet-".into(),
        bin_prefix: "fleetbin".into(),
        timeout: Duration::from_secs(30),
        grace: Duration::from_secs(60),
        server_pid: None,
        state_file: None,
        clk_tck: 100,
        bad_hash: None,
        bad_bin: String::new(),
        check: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--addr" => o.addr = value.parse().map_err(|e| format!("--addr: {e}"))?,
            "--nodes" => o.nodes = num(value)? as usize,
            "--bins" => o.bins = num(value)? as usize,
            "--window" => o.window = num(value)?,
            "--rounds" => o.rounds = num(value)? as usize,
            "--threads" => o.threads = num(value)? as usize,
            "--arch" => o.arch = value.clone(),
            "--node-prefix" => o.node_prefix = value.clone(),
            "--bin-prefix" => o.bin_prefix = value.clone(),
            "--timeout" => o.timeout = Duration::from_secs(num(value)?),
            "--grace" => o.grace = Duration::from_secs(num(value)?),
            "--server-pid" => o.server_pid = Some(num(value)? as u32),
            "--state-file" => o.state_file = Some(PathBuf::from(value)),
            "--clk-tck" => o.clk_tck = num(value)?.max(1),
            "--bad-hash" => o.bad_hash = Some(value.to_ascii_lowercase()),
            "--bad-bin" => o.bad_bin = value.clone(),
            "--mode" => {
                o.check = match value.as_str() {
                    "check" => true,
                    "bins" => false,
                    _ => return Err(format!("--mode: bins or check, not {value}")),
                }
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if o.nodes == 0 || o.rounds == 0 || o.threads == 0 || o.window == 0 {
        return Err("--nodes, --rounds, --threads and --window must be positive".into());
    }
    if o.bins > 1000 || o.rounds > 100 || o.threads > 4096 {
        return Err("at most 1000 binaries, 100 rounds and 4096 threads".into());
    }
    if o.bad_hash.is_some() && o.bad_bin.is_empty() {
        return Err("--bad-hash needs --bad-bin NAME".into());
    }
    if !o.addr.ip().is_loopback() {
        return Err("--addr must be a loopback address (127.x)".into());
    }
    Ok(o)
}

/// The agent's splay (src/agent.rs): a fixed per-node delay in 0..=max seconds.
fn splay(node: &str, max: u64) -> u64 {
    let mut md5 = bin_proxy::hash::Md5::new();
    md5.update(node.as_bytes());
    let hex = md5.hex();
    u64::from_str_radix(&hex[..12], 16).unwrap_or(0) % (max + 1)
}

/// One scheduled node run.
#[derive(Clone, Copy)]
struct Run {
    due: Duration,
    node: usize,
    round: usize,
}

/// What one round measured (per thread, merged at the end).
#[derive(Default, Clone)]
struct RoundStats {
    runs: u64,
    requests: u64,
    ok: u64,
    registrations: u64,
    /// Check mode: `304 Not Modified` answers (idle runs).
    not_modified: u64,
    errors: BTreeMap<String, u64>,
    /// Latency of every request, microseconds, by [`KINDS`].
    lat_us: [Vec<u32>; 4],
    /// How late each run started, milliseconds.
    late_ms: Vec<u32>,
    aborted_runs: u64,
    skipped_runs: u64,
    first_start: Option<Duration>,
    last_end: Option<Duration>,
}

impl RoundStats {
    fn merge(&mut self, o: RoundStats) {
        self.runs += o.runs;
        self.requests += o.requests;
        self.ok += o.ok;
        self.registrations += o.registrations;
        self.not_modified += o.not_modified;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (a, b) in self.lat_us.iter_mut().zip(o.lat_us) {
            a.extend(b);
        }
        self.late_ms.extend(o.late_ms);
        self.aborted_runs += o.aborted_runs;
        self.skipped_runs += o.skipped_runs;
        self.first_start = min_opt(self.first_start, o.first_start);
        self.last_end = self.last_end.max(o.last_end);
    }
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The request kinds latency is reported for.
const KINDS: [&str; 4] = [
    "GET keepalive",
    "POST keepalive (registration)",
    "GET bins/NAME",
    "POST check",
];

/// Per-thread results: one [`RoundStats`] per round, and per second since
/// the start, requests completed and the slowest of them (microseconds).
struct ThreadStats {
    rounds: Vec<RoundStats>,
    per_second: Vec<(u32, u32)>,
}

/// Shared, read-only context of the client threads.
struct Ctx {
    o: Opts,
    runs: Vec<Run>,
    next: AtomicUsize,
    start: Instant,
    /// No run starts (and no request is sent) after this.
    hard_deadline: Instant,
    host: String,
    registration_bins: String,
    /// Rollout mode: when each node first received the bad build, and when
    /// each failure report was answered (since the start).
    received: std::sync::Mutex<BTreeMap<usize, Duration>>,
    failures: std::sync::Mutex<Vec<Duration>>,
    /// Check mode: each node's last ETag.
    etags: Vec<std::sync::Mutex<String>>,
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fleet: {e}");
            std::process::exit(2);
        }
    };
    let names: Vec<String> = (0..o.nodes)
        .map(|i| format!("{}{i:05}", o.node_prefix))
        .collect();
    let mut runs = Vec::with_capacity(o.nodes * o.rounds);
    for round in 0..o.rounds {
        for (node, name) in names.iter().enumerate() {
            let secs = round as u64 * o.window + splay(name, o.window);
            runs.push(Run {
                due: Duration::from_secs(secs),
                node,
                round,
            });
        }
    }
    runs.sort_by_key(|r| (r.due, r.node, r.round));
    let last_due = runs.last().map_or(Duration::ZERO, |r| r.due);
    let registration_bins = (0..o.bins)
        .map(|b| {
            format!(
                "{{\"name\":\"{}{b:03}\",\"version\":\"latest\",\"hash\":\"\"}}",
                o.bin_prefix
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let start = Instant::now();
    let ctx = Arc::new(Ctx {
        host: o.addr.to_string(),
        hard_deadline: start + last_due + o.grace,
        o: o.clone(),
        runs,
        next: AtomicUsize::new(0),
        start,
        registration_bins,
        received: std::sync::Mutex::new(BTreeMap::new()),
        failures: std::sync::Mutex::new(Vec::new()),
        etags: (0..if o.check { o.nodes } else { 0 })
            .map(|_| std::sync::Mutex::new(String::new()))
            .collect(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let sampler = o.server_pid.map(|pid| {
        let (o, done) = (o.clone(), done.clone());
        std::thread::spawn(move || sample_server(pid, &o, start, &done))
    });
    let watcher = o.bad_hash.as_ref().map(|_| {
        let (ctx, done) = (ctx.clone(), done.clone());
        std::thread::spawn(move || watch_rollout(&ctx, &done))
    });
    let client_cpu0 = proc_cpu_ticks("self");
    eprintln!(
        "fleet: {} nodes x {} binaries, {} round(s) of {} s, {} threads, {}",
        o.nodes, o.bins, o.rounds, o.window, o.threads, o.addr
    );
    let mut handles = Vec::with_capacity(o.threads);
    for i in 0..o.threads {
        let ctx = ctx.clone();
        let h = std::thread::Builder::new()
            .name(format!("fleet-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || client_thread(&ctx));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("fleet: cannot start thread {i}: {e}");
                break;
            }
        }
    }
    let mut rounds = vec![RoundStats::default(); o.rounds];
    let mut per_second: Vec<(u64, u32)> = Vec::new();
    for h in handles {
        let Ok(t) = h.join() else {
            eprintln!("fleet: a client thread panicked");
            continue;
        };
        for (r, s) in rounds.iter_mut().zip(t.rounds) {
            r.merge(s);
        }
        if per_second.len() < t.per_second.len() {
            per_second.resize(t.per_second.len(), (0, 0));
        }
        for (a, b) in per_second.iter_mut().zip(t.per_second) {
            a.0 += u64::from(b.0);
            a.1 = a.1.max(b.1);
        }
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let client_cpu = match (client_cpu0, proc_cpu_ticks("self")) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let server = sampler.and_then(|h| h.join().ok());
    let halt = watcher.and_then(|h| h.join().ok());
    report(
        &o,
        &rounds,
        &per_second,
        elapsed,
        client_cpu,
        server.as_ref(),
    );
    if o.bad_hash.is_some() {
        report_rollout(&ctx, halt.flatten());
    }
}

/// Polls `GET rollouts/BIN` every 50 ms until the simulation ends; returns
/// when it was first seen paused and its counts then.
fn watch_rollout(ctx: &Ctx, done: &AtomicBool) -> Option<(Duration, String)> {
    let target = format!("/api/v1/rollouts/{}", ctx.o.bad_bin);
    while !done.load(Ordering::Relaxed) {
        if let Ok((200, body, _)) = request(ctx, "GET", &target, None, None) {
            let text = String::from_utf8_lossy(&body);
            if text.contains("\"state\":\"paused\"") {
                let at = ctx.start.elapsed();
                let nodes = text.find("\"nodes\":").map_or("", |i| &text[i..]);
                return Some((at, nodes.trim_end_matches('}').to_string()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The rollout mode's table.
fn report_rollout(ctx: &Ctx, halt: Option<(Duration, String)>) {
    let received = ctx.received.lock().unwrap_or_else(|p| p.into_inner());
    let failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let first = received.values().min().copied();
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!(
        "\nRollout of a bad build ({}): every node that installs it fails and reports it.\n",
        ctx.o.bad_bin
    );
    println!("| nodes that ever received it | failures reported | first received | paused (seen by a 50 ms poll) | first receipt → paused | failures answered before the pause | last of them → paused | counts when paused |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    match halt {
        Some((at, counts)) => {
            let before: Vec<&Duration> = failures.iter().filter(|f| **f <= at).collect();
            let last = before.iter().max().map(|l| at.saturating_sub(**l));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | `{counts}` |",
                received.len(),
                failures.len(),
                first.map_or("-".into(), secs),
                secs(at),
                first.map_or("-".into(), |f| secs(at.saturating_sub(f))),
                before.len(),
                last.map_or("-".into(), secs),
            );
        }
        None => println!(
            "| {} | {} | {} | never | - | - | - | - |",
            received.len(),
            failures.len(),
            first.map_or("-".into(), secs)
        ),
    }
}

fn client_thread(ctx: &Ctx) -> ThreadStats {
    let mut st = ThreadStats {
        rounds: vec![RoundStats::default(); ctx.o.rounds],
        per_second: Vec::new(),
    };
    // Each index is taken once: at most runs.len() iterations.
    loop {
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        let Some(run) = ctx.runs.get(i).copied() else {
            break;
        };
        let due = ctx.start + run.due;
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let stats = &mut st.rounds[run.round];
        if Instant::now() >= ctx.hard_deadline {
            stats.skipped_runs += 1;
            continue;
        }
        let began = Instant::now();
        stats.late_ms.push(
            began
                .saturating_duration_since(due)
                .as_millis()
                .min(u32::MAX as u128) as u32,
        );
        stats.runs += 1;
        node_run(ctx, run, &mut st);
    }
    st
}

/// What one idle agent run sends.
fn node_run(ctx: &Ctx, run: Run, st: &mut ThreadStats) {
    let node = format!("{}{:05}", ctx.o.node_prefix, run.node);
    let arch = &ctx.o.arch;
    let keepalive = format!("/api/v1/keepalive?node={node}&arch={arch}");
    let mut targets: Vec<(&str, String, Option<String>)> = Vec::with_capacity(ctx.o.bins + 2);
    if ctx.o.check {
        let bins: Vec<String> = (0..ctx.o.bins)
            .map(|b| format!("{{\"name\":\"{}{b:03}\"}}", ctx.o.bin_prefix))
            .collect();
        let body = format!(
            "{{\"node\":\"{node}\",\"arch\":\"{arch}\",\"binaries\":[{}]}}",
            bins.join(",")
        );
        targets.push(("POST", "/api/v1/check".to_string(), Some(body)));
    } else {
        targets.push(("GET", keepalive.clone(), None));
    }
    for b in 0..if ctx.o.check { 0 } else { ctx.o.bins } {
        targets.push((
            "GET",
            format!(
                "/api/v1/bins/{}{b:03}?arch={arch}&node={node}",
                ctx.o.bin_prefix
            ),
            None,
        ));
    }
    let mut idx = 0;
    while idx < targets.len() {
        if Instant::now() >= ctx.hard_deadline {
            st.rounds[run.round].aborted_runs += 1;
            return;
        }
        let (method, target, sent) = &targets[idx];
        let reports_failure = sent.as_deref().is_some_and(|b| b.contains("\"failures\""));
        let t0 = Instant::now();
        let is_check = target == "/api/v1/check";
        let etag = if is_check {
            let e = ctx.etags[run.node]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Some(e.clone()).filter(|e| !e.is_empty())
        } else {
            None
        };
        let result = request(ctx, method, target, sent.as_deref(), etag.as_deref());
        let t1 = Instant::now();
        let us = t1.duration_since(t0).as_micros().min(u32::MAX as u128) as u32;
        let sec = t1.duration_since(ctx.start).as_secs() as usize;
        if st.per_second.len() <= sec {
            st.per_second.resize(sec + 1, (0, 0));
        }
        st.per_second[sec].0 += 1;
        st.per_second[sec].1 = st.per_second[sec].1.max(us);
        let stats = &mut st.rounds[run.round];
        stats.requests += 1;
        let kind = match (idx, *method) {
            _ if is_check => 3,
            (0, _) => 0,
            (_, "POST") => 1,
            _ => 2,
        };
        stats.lat_us[kind].push(us);
        let rel0 = t0.duration_since(ctx.start);
        stats.first_start = min_opt(stats.first_start, Some(rel0));
        stats.last_end = stats.last_end.max(Some(t1.duration_since(ctx.start)));
        let verdict = match result {
            Err(kind) => Err(kind),
            Ok((304, _, _)) if is_check => {
                stats.ok += 1;
                stats.not_modified += 1;
                Ok(())
            }
            Ok((200, body, tag)) if is_check && body.starts_with(b"{\"code\":200") => {
                if let Some(tag) = tag {
                    *ctx.etags[run.node]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = tag;
                }
                if String::from_utf8_lossy(&body).contains("\"registered\":false") {
                    let reg = format!(
                        "{{\"name\":\"{node}\",\"cpuArch\":\"{arch}\",\"osRelease\":\"Debian GNU/Linux 12 (bookworm)\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{}],\"lastSeen\":\"\"}}",
                        ctx.registration_bins
                    );
                    targets.insert(idx + 1, ("POST", keepalive.clone(), Some(reg)));
                }
                stats.ok += 1;
                Ok(())
            }
            // The first keepalive of an unknown node: register, as the agent does.
            Ok((404, _, _)) if idx == 0 => {
                let reg = format!(
                    "{{\"name\":\"{node}\",\"cpuArch\":\"{arch}\",\"osRelease\":\"Debian GNU/Linux 12 (bookworm)\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{}],\"lastSeen\":\"\"}}",
                    ctx.registration_bins
                );
                targets.insert(1, ("POST", keepalive.clone(), Some(reg)));
                stats.ok += 1; // a valid answer: "not registered"
                Ok(())
            }
            Ok((200, body, _)) if body.starts_with(b"{\"code\":200") => {
                if *method == "POST" {
                    stats.registrations += 1;
                }
                if reports_failure {
                    let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
                    f.push(t1.duration_since(ctx.start));
                }
                stats.ok += 1;
                if let Some(failure) = install_bad(ctx, run.node, &node, target, &body) {
                    targets.insert(idx + 1, ("POST", keepalive.clone(), Some(failure)));
                }
                Ok(())
            }
            Ok((200, _, _)) => Err("200 without envelope code 200".to_string()),
            Ok((status, _, _)) => Err(format!("HTTP {status}")),
        };
        if let Err(kind) = verdict {
            *stats.errors.entry(kind).or_default() += 1;
        }
        idx += 1;
    }
}

/// Rollout mode: when a `bins/` answer names the bad build for a node that
/// has not had it yet, the node "installs" it and it fails; returns the
/// keepalive body that reports the failure (sent next, as an agent does).
fn install_bad(ctx: &Ctx, index: usize, node: &str, target: &str, body: &[u8]) -> Option<String> {
    let bad = ctx.o.bad_hash.as_ref()?;
    let prefix = format!("/api/v1/bins/{}?", ctx.o.bad_bin);
    if !target.starts_with(&prefix)
        || !String::from_utf8_lossy(body).contains(&format!("\"hash\":\"{bad}\""))
    {
        return None;
    }
    let mut received = ctx.received.lock().unwrap_or_else(|p| p.into_inner());
    if received.contains_key(&index) {
        return None; // it failed here before: held back, as the agent does
    }
    received.insert(index, ctx.start.elapsed());
    Some(format!(
        "{{\"name\":\"{node}\",\"cpuArch\":\"{}\",\"osRelease\":\"Debian GNU/Linux 12 (bookworm)\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{}],\"lastSeen\":\"\",\"failures\":[{{\"name\":\"{}\",\"hash\":\"{bad}\",\"error\":\"postUpgrade exited with status 1\",\"at\":\"\"}}]}}",
        ctx.o.arch, ctx.registration_bins, ctx.o.bad_bin
    ))
}

/// One request on a new connection; `Ok((status, body))` or an error kind.
fn request(
    ctx: &Ctx,
    method: &str,
    target: &str,
    body: Option<&str>,
    if_none_match: Option<&str>,
) -> Result<(u16, Vec<u8>, Option<String>), String> {
    let timeout = ctx.o.timeout;
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&ctx.o.addr, timeout)
        .map_err(|e| format!("connect: {}", err_name(&e)))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fleet-sim\r\nAccept: */*\r\nConnection: close\r\n",
        ctx.host
    );
    if let Some(tag) = if_none_match {
        req.push_str(&format!("If-None-Match: {tag}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.set_write_timeout(Some(timeout))
        .map_err(|e| format!("setsockopt: {}", err_name(&e)))?;
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {}", err_name(&e)))?;
    let mut resp = Vec::with_capacity(4096);
    let mut buf = [0u8; 16 * 1024];
    // Bounded: every pass reads at least one byte (up to MAX_RESPONSE) or ends,
    // and the deadline ends a slow drip.
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err("read: deadline".into());
        }
        s.set_read_timeout(Some(deadline - now))
            .map_err(|e| format!("setsockopt: {}", err_name(&e)))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > MAX_RESPONSE {
                    return Err("response too large".into());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {}", err_name(&e))),
        }
    }
    parse_response(&resp)
}

/// Status, body and ETag of a whole response.
fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>, Option<String>), String> {
    if resp.is_empty() {
        return Err("empty answer (closed without a response)".into());
    }
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("truncated response head")?;
    let head = String::from_utf8_lossy(&resp[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or("malformed status line")?;
    let body = &resp[end + 4..];
    let (mut length, mut etag) = (None, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        } else if k.trim().eq_ignore_ascii_case("etag") {
            etag = Some(v.trim().to_string());
        }
    }
    match length {
        Some(n) if n != body.len() => Err("body shorter than Content-Length".into()),
        _ => Ok((status, body.to_vec(), etag)),
    }
}

fn err_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(99) => "EADDRNOTAVAIL".into(),
        Some(98) => "EADDRINUSE".into(),
        Some(104) => "ECONNRESET".into(),
        Some(111) => "ECONNREFUSED".into(),
        Some(110) => "ETIMEDOUT".into(),
        Some(32) => "EPIPE".into(),
        Some(24) => "EMFILE".into(),
        Some(11) => "timeout (EAGAIN)".into(),
        Some(n) => format!("os error {n}"),
        None => format!("{:?}", e.kind()),
    }
}

/// utime+stime of a process (`self` or a pid), in clock ticks.
fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

fn proc_write_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What the sampler saw of the server.
#[derive(Default)]
struct ServerStats {
    /// Per round window: CPU ticks, disk bytes written, snapshot rewrites,
    /// wall time.
    cpu_ticks: Vec<u64>,
    write_bytes: Vec<u64>,
    snapshot_rewrites: Vec<u64>,
    /// When a snapshot rewrite was seen, seconds since the start.
    rewrite_at: Vec<f64>,
    wall: Vec<Duration>,
    max_log_len: u64,
    max_snapshot_len: u64,
    vm_hwm_kb: Option<u64>,
    vm_rss_kb: Option<u64>,
    /// (thread role, state, wait channel) → samples.
    thread_states: HashMap<(String, String), u64>,
    samples: u64,
    /// Thread role → samples (a role may be many threads).
    role_samples: HashMap<String, u64>,
}

fn sample_server(pid: u32, o: &Opts, start: Instant, done: &AtomicBool) -> ServerStats {
    let mut s = ServerStats {
        cpu_ticks: vec![0; o.rounds],
        write_bytes: vec![0; o.rounds],
        snapshot_rewrites: vec![0; o.rounds],
        wall: vec![Duration::ZERO; o.rounds],
        ..ServerStats::default()
    };
    let pid_s = pid.to_string();
    let log_path = o.state_file.as_ref().map(|p| {
        let mut l = p.as_os_str().to_owned();
        l.push(".log");
        PathBuf::from(l)
    });
    let ino = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| (m.ino(), m.len()))
    };
    let (mut cpu, mut wb) = (proc_cpu_ticks(&pid_s), proc_write_bytes(pid));
    let mut snap = ino(&o.state_file);
    let mut last = Instant::now();
    let window = Duration::from_secs(o.window);
    // Bounded by the simulation, which is bounded; and at most 24 h of samples.
    for _ in 0..(24 * 3600 * 10) {
        let stop = done.load(Ordering::Relaxed);
        if !stop {
            std::thread::sleep(SAMPLE_EVERY);
        }
        let now = Instant::now();
        let w = ((now.duration_since(start).as_secs_f64() / window.as_secs_f64()) as usize)
            .min(o.rounds - 1);
        s.wall[w] += now - last;
        last = now;
        let (c, b) = (proc_cpu_ticks(&pid_s), proc_write_bytes(pid));
        if let (Some(a), Some(c)) = (cpu, c) {
            s.cpu_ticks[w] += c.saturating_sub(a);
        }
        if let (Some(a), Some(b)) = (wb, b) {
            s.write_bytes[w] += b.saturating_sub(a);
        }
        (cpu, wb) = (c.or(cpu), b.or(wb));
        let now_snap = ino(&o.state_file);
        if let (Some((a, _)), Some((b, len))) = (snap, now_snap) {
            if a != b {
                s.snapshot_rewrites[w] += 1;
                s.rewrite_at.push(now.duration_since(start).as_secs_f64());
            }
            s.max_snapshot_len = s.max_snapshot_len.max(len);
        }
        snap = now_snap.or(snap);
        if let Some((_, len)) = ino(&log_path) {
            s.max_log_len = s.max_log_len.max(len);
        }
        if let Some(v) = proc_status_kb(pid, "VmHWM:") {
            s.vm_hwm_kb = Some(v);
        }
        if let Some(v) = proc_status_kb(pid, "VmRSS:") {
            s.vm_rss_kb = Some(v);
        }
        if !stop {
            sample_threads(pid, &mut s);
        }
        if stop {
            break;
        }
    }
    s
}

/// Counts each server thread's state and kernel wait channel.
fn sample_threads(pid: u32, s: &mut ServerStats) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    s.samples += 1;
    for task in dir.flatten().take(4096) {
        let p = task.path();
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let state = stat[close + 2..].chars().next().unwrap_or('?');
        let tid = task.file_name().to_string_lossy().into_owned();
        let role = if tid == pid.to_string() {
            "main (accept)".to_string()
        } else if comm.starts_with("worker-") {
            "worker".to_string()
        } else {
            format!("{comm} (tid {tid})")
        };
        *s.role_samples.entry(role.clone()).or_default() += 1;
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        let what = match (state, wchan.trim()) {
            ('R', _) => "R (running or runnable)".to_string(),
            (st, "" | "0") => format!("{st}"),
            (st, w) => format!("{st} {w}"),
        };
        *s.thread_states.entry((role, what)).or_default() += 1;
    }
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(us: u32) -> String {
    format!("{:.2} ms", f64::from(us) / 1000.0)
}

fn report(
    o: &Opts,
    rounds: &[RoundStats],
    per_second: &[(u64, u32)],
    elapsed: Duration,
    client_cpu: Option<u64>,
    server: Option<&ServerStats>,
) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tick = |t: u64| t as f64 / o.clk_tck as f64;
    println!(
        "Fleet: {} nodes x {} binaries, {} round(s) of {} s (per-node splay as `bin-proxy --splay {}`), {} client threads, one new connection per request.\n",
        o.nodes, o.bins, o.rounds, o.window, o.window, o.threads
    );
    println!("| round | node runs | requests | errors | registrations | achieved req/s | p50 | p99 | max | runs started >1 s late (max) | server CPU (% of 1 core / of {cores} cores) | server disk writes | snapshot rewrites |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = RoundStats::default();
    for (i, r) in rounds.iter().enumerate() {
        print_round(&format!("{}", i + 1), r, server, Some(i), &tick, cores);
        all.merge(r.clone());
    }
    if rounds.len() > 1 {
        print_round("all", &all, server, None, &tick, cores);
    }
    println!();
    let peak = per_second.iter().map(|p| p.0).max().unwrap_or(0);
    let total_s = elapsed.as_secs_f64();
    println!(
        "Total: {} requests ({} ok, {} errors) in {:.1} s = {:.0} req/s on average, busiest second {} requests; {} runs skipped, {} aborted (past the deadline).",
        all.requests,
        all.ok,
        all.requests - all.ok,
        total_s,
        all.requests as f64 / total_s,
        peak,
        all.skipped_runs,
        all.aborted_runs
    );
    if o.check {
        println!(
            "Checks answered 304 Not Modified (idle runs of one request): {}.",
            all.not_modified
        );
    }
    if let Some(t) = client_cpu {
        println!(
            "Client (this simulator, same machine): {:.1} s CPU = {:.0}% of one core.",
            tick(t),
            tick(t) / total_s * 100.0
        );
    }
    println!("\n| round | request | count | p50 | p99 | max |");
    println!("|---|---|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        for (k, name) in KINDS.iter().enumerate() {
            let mut lat = r.lat_us[k].clone();
            if lat.is_empty() {
                continue;
            }
            lat.sort_unstable();
            println!(
                "| {} | {name} | {} | {} | {} | {} |",
                i + 1,
                lat.len(),
                ms(pct(&lat, 50.0)),
                ms(pct(&lat, 99.0)),
                ms(lat.last().copied().unwrap_or(0))
            );
        }
    }
    let mut slow: Vec<(usize, u32)> = per_second
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.1))
        .collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.1));
    let slow: Vec<String> = slow
        .iter()
        .take(5)
        .map(|(i, us)| format!("{i}–{} s: {}", i + 1, ms(*us)))
        .collect();
    println!(
        "\nSlowest seconds (by the slowest request completed in them): {}.",
        slow.join(", ")
    );
    if let Some(s) = server.filter(|s| !s.rewrite_at.is_empty()) {
        let at: Vec<String> = s.rewrite_at.iter().map(|t| format!("{t:.1} s")).collect();
        println!(
            "Registry snapshot rewritten (log folded, seen within 0.1 s) at: {}.",
            at.join(", ")
        );
    }
    let kinds: BTreeMap<&String, ()> = rounds
        .iter()
        .flat_map(|r| r.errors.keys().map(|k| (k, ())))
        .collect();
    if kinds.is_empty() {
        println!("Errors by kind: none.");
    } else {
        println!("\n| error | {} |", header_rounds(rounds.len()));
        println!("|---|{}", "---:|".repeat(rounds.len()));
        for k in kinds.keys() {
            let cells: Vec<String> = rounds
                .iter()
                .map(|r| r.errors.get(*k).copied().unwrap_or(0).to_string())
                .collect();
            println!("| {k} | {} |", cells.join(" | "));
        }
    }
    if let Some(s) = server {
        let total: u64 = s.cpu_ticks.iter().sum();
        println!(
            "\nServer: {:.1} s CPU over the run ({:.0}% of one core, {:.0}% of the {cores}-core machine); peak RSS (VmHWM) {} KiB, RSS at the end {} KiB; registry log up to {} bytes, snapshot up to {} bytes.",
            tick(total),
            tick(total) / total_s * 100.0,
            tick(total) / total_s * 100.0 / cores as f64,
            s.vm_hwm_kb.map_or("?".into(), |v| v.to_string()),
            s.vm_rss_kb.map_or("?".into(), |v| v.to_string()),
            s.max_log_len,
            s.max_snapshot_len,
        );
        if s.samples > 0 {
            println!(
                "\nServer threads, sampled every {} ms ({} samples; share of that thread's, or all workers', samples):\n",
                SAMPLE_EVERY.as_millis(),
                s.samples
            );
            println!("| thread | state and kernel wait channel | share |");
            println!("|---|---|---:|");
            let mut rows: Vec<(&(String, String), &u64)> = s.thread_states.iter().collect();
            rows.sort_by(|a, b| a.0 .0.cmp(&b.0 .0).then(b.1.cmp(a.1)));
            for ((role, what), n) in rows.into_iter().take(40) {
                let of = s.role_samples.get(role).copied().unwrap_or(1).max(1);
                let share = format!("{:.1}%", *n as f64 * 100.0 / of as f64);
                println!("| {role} | {what} | {share} |");
            }
        }
    }
}

fn header_rounds(n: usize) -> String {
    (1..=n)
        .map(|i| format!("round {i}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn print_round(
    label: &str,
    r: &RoundStats,
    server: Option<&ServerStats>,
    window: Option<usize>,
    tick: &dyn Fn(u64) -> f64,
    cores: usize,
) {
    let mut lat: Vec<u32> = r.lat_us.concat();
    lat.sort_unstable();
    let span = match (r.first_start, r.last_end) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let late = r.late_ms.iter().filter(|&&l| l > 1000).count();
    let max_late = r.late_ms.iter().copied().max().unwrap_or(0);
    let (cpu, writes, rewrites) = match server {
        Some(s) => {
            let pick = |v: &[u64]| match window {
                Some(w) => v.get(w).copied().unwrap_or(0),
                None => v.iter().sum(),
            };
            let wall = match window {
                Some(w) => s.wall.get(w).copied().unwrap_or_default(),
                None => s.wall.iter().sum(),
            }
            .as_secs_f64()
            .max(0.001);
            let c = tick(pick(&s.cpu_ticks));
            (
                format!(
                    "{:.0}% / {:.0}%",
                    c / wall * 100.0,
                    c / wall * 100.0 / cores as f64
                ),
                format!("{:.1} MB", pick(&s.write_bytes) as f64 / 1e6),
                pick(&s.snapshot_rewrites).to_string(),
            )
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    println!(
        "| {label} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {late} ({:.1} s) | {cpu} | {writes} | {rewrites} |",
        r.runs,
        r.requests,
        r.requests - r.ok,
        r.registrations,
        if span > 0.0 { r.requests as f64 / span } else { 0.0 },
        ms(pct(&lat, 50.0)),
        ms(pct(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or(0)),
        f64::from(max_late) / 1000.0,
    );
}
