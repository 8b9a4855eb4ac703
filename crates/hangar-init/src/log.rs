//! Timestamped lines on the console (init's stdout and stderr, which Hangar captures into the
//! sandbox's console log): init's own, and the agent's (see [`crate::output`]).
//!
//! Deliberately tiny: no subscriber, no levels, no buffering. Every line leaves in one `write`
//! under one lock, so that lines from init's tasks and from the agent's output threads never
//! interleave mid-line. It must never write the control secret or file contents.

use std::os::fd::AsFd;
use std::sync::Mutex;

use nix::errno::Errno;

/// Writes one line `2026-11-27T10:00:00.123Z hangar-init: message` to stderr.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::init_line(format_args!($($arg)*))
    };
}

/// Serialises writes to the console: the agent's two streams and init's own share it.
static CONSOLE: Mutex<()> = Mutex::new(());

/// Which of init's descriptors a line goes to (both are the console).
#[derive(Debug, Clone, Copy)]
pub enum Console {
    Stdout,
    Stderr,
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Writes one of init's own lines to stderr.
pub fn init_line(message: std::fmt::Arguments<'_>) {
    let line = format!(
        "{} {} {message}\n",
        timestamp(),
        hangar_proto::console::INIT_TAG
    );
    write(Console::Stderr, line.as_bytes());
}

/// Writes `bytes` (whole lines) to the console at once. A console that fails (closed, full)
/// loses the line: there is nowhere else to report it, and the caller must not stop for it.
pub fn write(to: Console, bytes: &[u8]) {
    let _guard = CONSOLE.lock().unwrap_or_else(|e| e.into_inner());
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let fd = match to {
        Console::Stdout => stdout.as_fd(),
        Console::Stderr => stderr.as_fd(),
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        match nix::unistd::write(fd, rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
