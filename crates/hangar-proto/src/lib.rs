//! Wire types shared by Hangar's HTTP API, its CLI and `hangar-init`.
//!
//! This crate is serde types only: no I/O, no validation beyond what serde does, no
//! dependency on any runtime. Request bodies reject unknown fields so that a typo in a
//! client is an error instead of a silently ignored setting.

pub mod error;
pub mod init;
pub mod sandbox;

pub use error::{ErrorBody, ErrorDetail};
