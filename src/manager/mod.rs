//! bin-manager: the server bin-proxy agents talk to. It serves the published
//! builds in binDir with their hashes ([`store`]), keeps the registry of the
//! nodes that check in ([`registry`]), and answers the protocol
//! ([`routes`]) over a small hardened HTTP/1.1 layer ([`http`]).

pub mod admin;
pub mod config;
pub mod database;
pub mod http;
pub mod identity;
pub mod keytool;
pub mod legacy;
pub mod limits;
pub mod record;
pub mod registry;
pub mod release;
pub mod rollout;
pub mod routes;
pub mod signing;
pub mod store;

use crate::cli::ManagerArgs;
use crate::error::{Error, Result};
use config::Config;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// How often batched lastSeen updates are written.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often the rollouts' health gate runs (failure reports run it at once).
const GATE_EVERY: Duration = Duration::from_secs(1);

/// Stale upload temp files are looked for every this many flushes (a minute).
const SWEEP_EVERY: u64 = 12;

/// Removes what crashed uploads left in binDir (see [`store::STALE_UPLOAD`]).
fn sweep_uploads(store: &store::Store) {
    let swept = store.sweep_stale_uploads();
    if swept > 0 {
        crate::info!("removed {swept} temp file(s) of interrupted uploads from binDir");
    }
}

/// Starts the server; returns on a start-up error, or once SIGTERM or
/// SIGINT stopped it (after the requests in flight finished, bounded).
pub fn run(args: &ManagerArgs) -> Result<()> {
    // Before any thread starts, so that every thread leaves these signals
    // to the signalfd the accept thread waits on.
    let stop = crate::sys::signal_fd(&[crate::sys::SIGTERM, crate::sys::SIGINT])
        .map_err(|e| Error::Other(format!("cannot set up signal handling: {e}")))?;
    let config = Config::resolve(args, &crate::cli::process_env)?;
    let store = store::Store::open(&config.bin_dir).map_err(|e| match e {
        Error::Io { path, source, .. } => Error::Config {
            path,
            msg: format!("binDir must be an existing, readable directory: {source}"),
        },
        other => other,
    })?;
    sweep_uploads(&store);
    let registry = match &config.database {
        Some(url) => registry::Registry::open_database(url)?,
        None => registry::Registry::open(&config.state_file)?,
    };
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| Error::Other(format!("cannot listen on {}: {e}", config.listen)))?;
    http::widen_backlog(&listener, 1024);
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("cannot read the bound address: {e}")))?;
    crate::info!(
        "bin-manager {} listening on http://{addr} (binDir \"{}\", state {}, {} known, token {}, publishing {}, node tokens {}, admission {})",
        env!("CARGO_PKG_VERSION"),
        config.bin_dir.display(),
        match registry.database() {
            Some(db) => format!("in database {db}"),
            None => format!("\"{}\"", config.state_file.display()),
        },
        match registry.len() {
            1 => "1 node".to_string(),
            n => format!("{n} nodes"),
        },
        if config.token.is_some() { "required" } else { "off" },
        if config.admin_token.is_some() { "on" } else { "off" },
        if config.require_node_tokens { "required" } else { "optional" },
        match config.admission {
            config::Admission::Open => "open",
            config::Admission::Manual => "manual",
        },
    );
    let app = Arc::new(routes::App {
        store,
        registry,
        token: config.token.clone(),
        admin_token: config.admin_token.clone(),
        max_upload: config.max_upload,
        policy: registry::Policy {
            require_tokens: config.require_node_tokens,
            manual_admission: config.admission == config::Admission::Manual,
            max_nodes: config.max_nodes,
        },
        admission: config.admission,
        rate: std::sync::Mutex::new(limits::RateLimit::new(config.registrations_per_minute)),
        client_rate: std::sync::Mutex::new(limits::RateLimit::per_second(
            config.max_requests_per_client_per_second,
        )),
        shed: std::sync::Mutex::new(limits::Shed::new(
            config.max_requests_per_second,
            std::time::Instant::now(),
        )),
        releases: release::Releases::new(config.rollouts.clone()),
        signing: signing::Signing {
            require: config.require_signatures,
            trusted: config.trusted_keys.clone(),
        },
        statements: signing::statements(&config.bin_dir)?,
    });
    let flusher = app.clone();
    std::thread::spawn(move || {
        for tick in 1u64.. {
            std::thread::sleep(FLUSH_EVERY);
            if let Err(e) = flusher.registry.flush_seen() {
                crate::error!("writing lastSeen updates: {e}");
            }
            if tick % SWEEP_EVERY == 0 {
                sweep_uploads(&flusher.store);
            }
        }
    });
    let gate = app.clone();
    std::thread::spawn(move || loop {
        // New builds moved into binDir are noticed here even when no agent
        // asks (hashing them keeps them, so that a rollout can still serve
        // a build a later `mv` replaces); then the health gate runs.
        gate.notice_publishes();
        if let Err(e) = gate.releases.tick(&gate.registry, None) {
            crate::error!("running the rollout health gate: {e}");
        }
        std::thread::sleep(GATE_EVERY);
    });
    let handler = app.clone();
    let opts = http::Options {
        workers: config.workers,
        per_client: config.workers_per_client,
        access_log: config.access_log,
    };
    let how = http::serve(
        listener,
        opts,
        Arc::new(move |req: &mut http::Request, ctx| handler.handle(req, ctx)),
        &stop,
    );
    if let Err(e) = app.registry.flush_seen() {
        crate::error!("writing lastSeen updates: {e}");
    }
    let name = crate::sys::signal_name(how.signal);
    if how.left > 0 {
        crate::warn!(
            "bin-manager stopped ({name}): stopped accepting, {} of {} requests in flight still unfinished after 30 s",
            how.left,
            how.in_flight
        );
    } else {
        crate::info!(
            "bin-manager stopped ({name}): stopped accepting, finished the {} in flight",
            match how.in_flight {
                1 => "1 request".to_string(),
                n => format!("{n} requests"),
            }
        );
    }
    Ok(())
}
