//! Running buildah, debootstrap and tar with their output streamed line by line.
//!
//! `hangar serve` is a child subreaper whose reaper thread owns `waitpid(-1)` (see
//! `hangar-sandbox`'s `reaper.rs`), so a child's exit status may be taken before tokio asks
//! for it. A child therefore runs under `sh`, which waits for it and prints its status as the
//! last line of stdout: the status travels through the pipe, not through `waitpid`. Each child
//! leads its own process group, which is killed if the operation is dropped half-way.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{ImageError, Progress};

/// How many lines of output a failure message carries.
const TAIL_LINES: usize = 30;
const EXIT_MARKER: &str = "@@hangar-exit-status ";

/// What a finished command printed.
pub(crate) struct Output {
    pub(crate) stdout: Vec<String>,
}

/// A command to run: the program (with the Debian package that provides it) and its arguments.
pub(crate) struct Cmd {
    program: &'static str,
    package: &'static str,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(String, std::ffi::OsString)>,
    cwd: Option<PathBuf>,
    /// Forward output lines to the progress sink.
    pub(crate) echo: bool,
}

impl Cmd {
    pub(crate) fn new(program: &'static str, package: &'static str) -> Cmd {
        Cmd {
            program,
            package,
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            echo: true,
        }
    }
    pub(crate) fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_owned());
        self
    }
    pub(crate) fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    pub(crate) fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Cmd {
        self.envs.push((k.to_string(), v.as_ref().to_owned()));
        self
    }
    pub(crate) fn current_dir(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }
    pub(crate) fn quiet(mut self) -> Cmd {
        self.echo = false;
        self
    }

    /// Runs to completion; a non-zero exit is [`ImageError::StepFailed`] carrying the last
    /// lines of output, named by `step`.
    pub(crate) async fn run(self, step: &str, progress: &Progress) -> Result<Output, ImageError> {
        let Some(path) = which(self.program) else {
            return Err(ImageError::ToolMissing {
                program: self.program,
                package: self.package,
            });
        };
        tracing::debug!(program = self.program, args = ?self.args, "running");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("\"$@\"; rc=$?; echo; echo \"{EXIT_MARKER}$rc\""))
            .arg("sh")
            .arg(&path)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(ImageError::io(format!("starting {}", self.program)))?;
        let _group = GroupGuard(child.id());
        let mut out = BufReader::new(child.stdout.take().expect("piped")).split(b'\n');
        let mut err = BufReader::new(child.stderr.take().expect("piped")).split(b'\n');
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut stdout = Vec::new();
        let mut status: Option<String> = None;
        let (mut out_open, mut err_open) = (true, true);
        let keep = |line: String, tail: &mut VecDeque<String>| {
            if self.echo && !line.is_empty() {
                progress.line(line.clone());
            }
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        };
        while out_open || err_open {
            tokio::select! {
                line = out.next_segment(), if out_open => match line {
                    Ok(Some(bytes)) => {
                        let line = String::from_utf8_lossy(&bytes).trim_end_matches('\r').to_string();
                        if let Some(code) = line.strip_prefix(EXIT_MARKER) {
                            status = Some(code.trim().to_string());
                        } else {
                            stdout.push(line.clone());
                            keep(line, &mut tail);
                        }
                    }
                    _ => out_open = false,
                },
                line = err.next_segment(), if err_open => match line {
                    Ok(Some(bytes)) => {
                        let line = String::from_utf8_lossy(&bytes).trim_end_matches('\r').to_string();
                        keep(line, &mut tail);
                    }
                    _ => err_open = false,
                },
            }
        }
        // The status came through the pipe; this wait only collects the shell if the reaper
        // thread has not (either answer is fine).
        let _ = child.wait().await;
        // The shell's `echo` before the marker ends a last line without a newline; it also
        // adds an empty line when the output did end with one.
        if stdout.last().is_some_and(|l| l.is_empty()) {
            stdout.pop();
            if tail.back().is_some_and(|l| l.is_empty()) {
                tail.pop_back();
            }
        }
        match status.as_deref() {
            Some("0") => Ok(Output { stdout }),
            other => Err(ImageError::StepFailed {
                step: step.to_string(),
                status: match other {
                    Some(code) => format!("exit status {code}"),
                    None => "killed".to_string(),
                },
                output: Vec::from(tail).join("\n"),
            }),
        }
    }
}

/// Kills the child's whole process group when the operation ends early.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // Once the shell has exited normally the group is empty and this is a no-op
            // (ESRCH); a reused id would lead a different group only after every member of
            // this one is gone.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The program's path in `PATH` (plus the sbin directories, where debootstrap lives).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_and_output() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = Progress::new(tx);
        let out = Cmd::new("sh", "dash")
            .args(["-c", "echo one; echo two >&2; printf three"])
            .run("the step", &progress)
            .await
            .unwrap();
        assert_eq!(out.stdout, ["one", "three"]);
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        lines.sort();
        assert_eq!(lines, ["one", "three", "two"]);
        let e = Cmd::new("sh", "dash")
            .args(["-c", "echo boom >&2; exit 3"])
            .run("the step", &Progress::none())
            .await
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("exit status 3") && msg.contains("boom"),
            "{msg}"
        );
        let e = Cmd::new("no-such-tool-hangar", "no-such-package")
            .run("x", &Progress::none())
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("apt-get install no-such-package"),
            "{e}"
        );
    }
}
