//! Sandboxes: isolated environments that run untrusted agent code, with a persistent volume,
//! resource limits, a loopback-only network and suspend/resume.
//!
//! The [`Driver`] trait is the only place that touches external runtimes (`crun`, `runsc`,
//! later QEMU), namespaces, cgroups and mounts; everything above it — the [`Sandboxes`]
//! service, the link to `hangar-init`, the egress proxy — is the same for every driver.
//! This crate never speaks HTTP to clients: the API crate does.

mod cmd;
pub mod console;
pub mod container;
pub mod driver;
pub mod egress;
pub mod gvisor;
pub mod link;
mod loopdev;
mod manager;
mod mounts;
pub mod netns;
mod oci;
pub mod probe;
mod reaper;
mod record;
pub mod vm;
mod volume;

pub use console::Consoles;
pub use driver::{Driver, DriverError, Layout, Recovered, Resumed, Suspended};
pub use link::{InitLink, LinkError};
pub use manager::{error_chain, Config, SandboxError, Sandboxes};
pub use probe::{probe_host, DriverProbe, HostProbe};
