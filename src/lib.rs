//! bin-proxy keeps a fleet's binaries on the builds its operators publish.
//!
//! Two executables share this crate: `bin-proxy`, the agent that runs on
//! every host from cron, and `bin-manager`, the server it talks to. The
//! agent's path through the modules: [`cli`] → [`agent`] → [`manifest`],
//! [`client`] → [`plan`] → [`install`] → [`service`]. See ARCHITECTURE.md.

pub mod log;

pub mod agent;
pub mod cli;
pub mod client;
pub mod error;
pub mod fetch;
pub mod fsutil;
pub mod hash;
pub mod host;
pub mod install;
pub mod json;
pub mod manager;
pub mod manifest;
pub mod plan;
pub mod protocol;
pub mod service;
pub mod state;
