//! `hangar-init`, PID 1 in every Hangar sandbox.
//!
//! It reads its configuration from the run directory (`/run/hangar`, shared with the host), reaps
//! orphans, runs and restarts the agent process (its output stamped line by line onto the
//! console), serves the authenticated control API of
//! [`hangar_proto::init`] on `control.sock`, forwards `agent.sock` to the agent's port and the
//! in-sandbox HTTP proxy port to the host's `egress.sock`. On `POST /suspend` it lets go of every
//! host socket so that gVisor can checkpoint, and binds them again on `SIGUSR2`.
//!
//! The binary is linked statically (see `build.rs`) because it runs inside arbitrary images. It
//! must therefore never use glibc's NSS (`getpwnam`, `getaddrinfo`): users are resolved by parsing
//! `/etc/passwd` by hand and every address it connects to is numeric.

#[macro_use]
pub mod log;
pub mod agent;
pub mod config;
pub mod control;
pub mod error;
pub mod exec;
pub mod files;
pub mod guard;
pub mod guest;
pub mod guest_link;
pub mod links;
pub mod output;
pub mod reaper;
pub mod resolve;
pub mod spawn;
pub mod startup;
pub mod token;
pub mod users;
