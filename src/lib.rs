//! bin-proxy keeps a fleet's binaries on the builds its operators publish.
//!
//! Two executables share this crate: `bin-proxy`, the agent that runs on
//! every host from cron ([`agent`]), and `bin-manager`, the server it talks
//! to ([`manager`]). The modules at the top level are shared by both and
//! import neither. See ARCHITECTURE.md for the map and its invariants.

#![deny(unsafe_code)] // allowed in `sys` alone

pub mod log;

pub mod cli;
pub mod error;
pub mod fsutil;
pub mod hash;
pub mod json;
pub mod protocol;
pub mod sign;
pub mod sys;

pub mod agent;
pub mod manager;
