//! Timestamped log lines on stderr, which Hangar captures into the sandbox log.
//!
//! Deliberately tiny: no subscriber, no levels, no buffering. It must never write the control
//! secret or file contents.

/// Writes one line `2026-11-27T10:00:00.123Z hangar-init: message` to stderr.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} hangar-init: {}", $crate::log::timestamp(), format_args!($($arg)*))
    };
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
