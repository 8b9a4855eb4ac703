//! Running the external programs the drivers rely on (`crun`, `runsc`, `mount`, `mkfs.ext4`),
//! with their stderr kept for the error message.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying the program's stderr.
pub fn run(cmd: &mut Command) -> Result<Output, CmdError> {
    let program = describe(cmd);
    let out = output(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map_err(|source| CmdError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            program,
            status: out.status.to_string(),
            stderr: tail(String::from_utf8_lossy(&out.stderr).trim(), 1500),
        });
    }
    Ok(out)
}

/// `Command::output` through the reaper: stdout and stderr are read to the end, then the
/// exit status is collected.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    use std::io::Read;
    let (mut child, rx) = crate::reaper::spawn(cmd)?;
    let mut stderr_pipe = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = stderr_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let mut stdout = Vec::new();
    if let Some(mut p) = child.stdout.take() {
        p.read_to_end(&mut stdout)?;
    }
    let stderr = err_thread.join().unwrap_or_default();
    let status = crate::reaper::wait(child, rx)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// `Command::status` through the reaper.
pub fn status(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    let (child, rx) = crate::reaper::spawn(cmd)?;
    crate::reaper::wait(child, rx)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(3) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Whether `name` is an executable on `PATH`.
pub fn which(name: impl AsRef<OsStr>) -> Option<std::path::PathBuf> {
    let name = name.as_ref();
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The last `max` characters of `s`: runtimes put the reason for a failure at the end.
pub fn tail(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_owned();
    }
    format!("…{}", s.chars().skip(n - max).collect::<String>())
}
