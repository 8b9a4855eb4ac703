//! Agents, versions and sessions.

#[derive(Clone)]
pub struct Agents {}
