//! Runs the real `hangar-init` binary as an ordinary process, its stdout and stderr appended
//! to one file as the drivers do with a sandbox's console, and checks what the agent printed
//! arrives there as stamped lines: cut at the bound, partial lines flushed, invalid UTF-8
//! replaced, and an agent whose output is not read for a while neither blocked for ever nor
//! killed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

struct Init {
    child: Child,
    dir: tempfile::TempDir,
}

impl Init {
    fn start(script: &str) -> Init {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let config = json!({
            "secret": "s",
            "agent": {"argv": ["sh", "-c", script]},
            "agent_port": 8088,
            "defaults": {"env": {}, "user": "", "cwd": "/"},
        });
        std::fs::write(run.join("init.json"), config.to_string()).unwrap();
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("console.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hangar-init"))
            .env("HANGAR_RUN_DIR", &run)
            .env("HANGAR_FILES_ROOT", dir.path())
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .unwrap();
        Init { child, dir }
    }

    fn console(&self) -> String {
        String::from_utf8(std::fs::read(self.dir.path().join("console.log")).unwrap())
            .expect("the console is valid UTF-8")
    }

    /// Waits until the console has a line ending with `tail`, and returns the console.
    fn wait_for(&self, tail: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let c = self.console();
            if c.lines().any(|l| l.ends_with(tail)) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "no line ending in {tail:?} on the console:\n{c}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        // SAFETY: kill() on the pid of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's lines of a stream, without their stamps (which are checked on the way).
fn lines_of(console: &str, stream: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            let (ts, rest) = l.split_once(' ')?;
            let text = rest.strip_prefix(stream)?.strip_prefix(' ')?;
            assert!(
                ts.len() == 24 && humantime::parse_rfc3339(ts).is_ok(),
                "not an RFC 3339 millisecond stamp: {l:?}"
            );
            Some(text.to_owned())
        })
        .collect()
}

#[test]
fn agent_output_becomes_stamped_lines() {
    let init = Init::start(
        "echo out1; echo err1 >&2; printf 'no end yet'; sleep 1; printf ' but now\\n'; \
         printf 'bad \\377 byte\\n'; head -c 40000 /dev/zero | tr '\\0' x; echo; \
         printf 'both\\n' >&2; echo last; exec sleep 600",
    );
    let console = init.wait_for("stdout last");
    let out = lines_of(&console, "stdout");
    let x = |n: usize| "x".repeat(n);
    assert_eq!(
        out,
        [
            "out1".to_owned(),
            "no end yet".to_owned(),
            " but now".to_owned(),
            "bad \u{fffd} byte".to_owned(),
            x(16384),
            x(16384),
            x(40000 - 2 * 16384),
            "last".to_owned(),
        ]
    );
    assert_eq!(lines_of(&console, "stderr"), ["err1", "both"]);
    assert!(
        console
            .lines()
            .any(|l| l.contains(" hangar-init: agent started (pid ")),
        "{console}"
    );
}

#[test]
fn a_console_that_is_not_read_holds_the_agent_back_without_losing_or_killing_it() {
    // Init's stdout is a pipe nobody reads at first: 2 MiB of output fill it and the agent's
    // own pipe, and the agent waits (as on a slow terminal) instead of dying or losing lines.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let script = "p=$(printf %0100d 0); i=0; \
                  while [ $i -lt 20000 ]; do echo \"line $i $p\"; i=$((i+1)); done; \
                  echo done; exec sleep 600";
    let config = json!({
        "secret": "s",
        "agent": {"argv": ["sh", "-c", script]},
        "agent_port": 8088,
        "defaults": {"env": {}, "user": "", "cwd": "/"},
    });
    std::fs::write(run.join("init.json"), config.to_string()).unwrap();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hangar-init"))
        .env("HANGAR_RUN_DIR", &run)
        .env("HANGAR_FILES_ROOT", dir.path())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _init = Init { child, dir };
    std::thread::sleep(Duration::from_secs(2));
    let mut console = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !console.ends_with(b" stdout done\n") {
        assert!(Instant::now() < deadline, "the agent never finished");
        use std::io::Read;
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "init closed its stdout");
        console.extend_from_slice(&buf[..n]);
    }
    let out = lines_of(&String::from_utf8(console).unwrap(), "stdout");
    assert_eq!(out.len(), 20001);
    for (i, l) in out[..20000].iter().enumerate() {
        assert!(l.starts_with(&format!("line {i} ")), "{l}");
    }
}
