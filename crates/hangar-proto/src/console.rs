//! A sandbox's console log: the line format `hangar-init` writes and the events the logs API
//! sends.
//!
//! Every line `hangar-init` writes starts with an RFC 3339 UTC timestamp with milliseconds and
//! a tag, separated by single spaces:
//!
//! ```text
//! 2026-11-27T10:00:00.123Z stdout the agent printed this
//! 2026-11-27T10:00:00.125Z stderr and this on stderr
//! 2026-11-27T10:00:00.130Z hangar-init: agent started (pid 7)
//! ```
//!
//! The agent's lines are cut at [`MAX_LINE`] bytes and are valid UTF-8 (invalid bytes were
//! replaced). Anything else on the console (the runtime's or the guest kernel's own messages)
//! has no timestamp and is reported as [`LogStream::Console`].

use serde::{Deserialize, Serialize};

/// The tag of `hangar-init`'s own lines.
pub const INIT_TAG: &str = "hangar-init:";

/// The longest piece of an agent's line that makes one console line, in bytes; a longer line
/// becomes several.
pub const MAX_LINE: usize = 16 * 1024;

/// Where a console line came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The agent's standard output.
    Stdout,
    /// The agent's standard error.
    Stderr,
    /// `hangar-init`, PID 1 of the sandbox.
    Init,
    /// Anything else on the console: the runtime's or the guest kernel's messages.
    Console,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Init => "init",
            LogStream::Console => "console",
        }
    }

    pub fn parse(s: &str) -> Option<LogStream> {
        match s {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            "init" => Some(LogStream::Init),
            "console" => Some(LogStream::Console),
            _ => None,
        }
    }
}

/// One console line, the `data` of a logs API event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    /// When `hangar-init` wrote it (RFC 3339 UTC, milliseconds); `null` for lines nobody
    /// stamped.
    pub ts: Option<String>,
    pub stream: LogStream,
    /// The text, without the timestamp, the tag and the line break.
    pub line: String,
}

/// The logs API's event that ends a followed stream because the session is gone.
pub const END_EVENT: &str = "end";
