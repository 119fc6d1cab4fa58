//! The control socket of a running monitor: `disco run --control PATH`
//! listens on a Unix stream socket at PATH, and `disco ctl PATH COMMAND`
//! (or any client that writes a line, e.g. `socat - UNIX-CONNECT:PATH`)
//! sends it commands while the guests run.
//!
//! One command per line, one reply line per command (`ok: ...` or
//! `error: ...`):
//! - `status`: each VM's name, state and the node of each of its vCPUs
//!   (reply lines joined with `; `);
//! - `move VM NODE [VCPU]`: re-pins every vCPU of VM `VM` (or only vCPU
//!   `VCPU`) to node `NODE`, as a `moves` entry of the config would; under a
//!   migrating policy the pages follow.
//!
//! The listener thread only parses: it hands each command to the monitor's
//! loop through a channel and waits for the answer, so every change to a VM
//! is made by the thread that owns the VMs, between two ticks of its loop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Move {
        vm: String,
        node: usize,
        vcpu: Option<usize>,
    },
}

/// The usage line every parse error ends with.
pub const USAGE: &str = "commands: `status`, `move VM NODE [VCPU]`";

impl Command {
    /// Parses one command line.
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |what: &str, w: &str| -> Result<usize, String> {
            w.parse()
                .map_err(|_| format!("{what} `{w}` is not a number; {USAGE}"))
        };
        match words.as_slice() {
            ["status"] => Ok(Command::Status),
            ["move", vm, node] => Ok(Command::Move {
                vm: vm.to_string(),
                node: number("NODE", node)?,
                vcpu: None,
            }),
            ["move", vm, node, vcpu] => Ok(Command::Move {
                vm: vm.to_string(),
                node: number("NODE", node)?,
                vcpu: Some(number("VCPU", vcpu)?),
            }),
            [] => Err(format!("empty command; {USAGE}")),
            [first, ..] => Err(format!("cannot read `{line}` (`{first}`...); {USAGE}")),
        }
    }
}

/// A command waiting for the monitor, with where to send the reply.
pub struct Request {
    pub command: Command,
    reply: mpsc::Sender<Result<String, String>>,
}

impl Request {
    /// Answers the client (`Ok` becomes `ok: ...`, `Err` `error: ...`).
    pub fn answer(self, result: Result<String, String>) {
        let _ = self.reply.send(result);
    }
}

/// How long a client waits for the monitor's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// The listening socket and its thread; dropping it stops the thread and
/// removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    requests: mpsc::Receiver<Request>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlSocket {
    /// Listens at `path`. An existing socket file is replaced only when no
    /// monitor answers on it (a stale socket of a run that died); any other
    /// existing file is an error, so nothing is overwritten by mistake.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "control socket {}: the path exists and is not a socket; choose another path",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {}: another monitor is listening there",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("control socket {}: cannot listen", path.display()))?;
        listener.set_nonblocking(true)?;
        let (tx, requests) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("disco-control".into())
            .spawn(move || serve(listener, tx, stop2))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commands that arrived since the last call.
    pub fn pending(&self) -> Vec<Request> {
        self.requests.try_iter().collect()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts clients one after another (commands are rare and short).
fn serve(listener: UnixListener, tx: mpsc::Sender<Request>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_client(stream, &tx, &stop) {
                    tracing::debug!("control client: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_client(stream: UnixStream, tx: &mpsc::Sender<Request>, stop: &AtomicBool) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let answer = match Command::parse(text) {
            Err(e) => Err(e),
            Ok(command) => {
                let (reply, answer) = mpsc::channel();
                if tx.send(Request { command, reply }).is_err() {
                    Err("the monitor is shutting down".to_string())
                } else {
                    answer.recv_timeout(ANSWER_LIMIT).unwrap_or_else(|_| {
                        Err("the monitor did not answer (is the run finishing?)".into())
                    })
                }
            }
        };
        let out = match answer {
            Ok(s) => format!("ok: {s}\n"),
            Err(s) => format!("error: {s}\n"),
        };
        writer.write_all(out.as_bytes())?;
    }
}

/// Sends one command line to the monitor listening at `path` and returns
/// its reply line (`ok: ...` or `error: ...`).
pub fn send(path: &Path, command: &str) -> Result<String> {
    let stream = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the control socket {} (is `disco run --control {}` running?)",
            path.display(),
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_LIMIT + Duration::from_secs(1)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{}\n", command.trim()).as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the monitor's reply")?;
    if reply.is_empty() {
        bail!("the monitor closed the connection without replying");
    }
    Ok(reply.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_errors_say_what_is_allowed() {
        assert_eq!(Command::parse(" status "), Ok(Command::Status));
        assert_eq!(
            Command::parse("move web-0 3"),
            Ok(Command::Move {
                vm: "web-0".into(),
                node: 3,
                vcpu: None
            })
        );
        assert_eq!(
            Command::parse("move web 1 0"),
            Ok(Command::Move {
                vm: "web".into(),
                node: 1,
                vcpu: Some(0)
            })
        );
        for bad in [
            "",
            "move",
            "move web",
            "move web x",
            "move web 1 y",
            "fly 1",
        ] {
            let e = Command::parse(bad).unwrap_err();
            assert!(e.contains(USAGE), "{bad:?}: {e}");
        }
        assert!(Command::parse("move web two")
            .unwrap_err()
            .contains("NODE `two`"));
    }

    fn bind_error(path: &Path) -> String {
        match ControlSocket::bind(path) {
            Ok(_) => panic!("binding {} should fail", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_round_trip_through_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("disco-control-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let socket = ControlSocket::bind(&path).unwrap();
        // A second monitor on the same path is refused.
        assert!(bind_error(&path).contains("another monitor"));
        let client = std::thread::spawn({
            let path = path.clone();
            move || (send(&path, "status").unwrap(), send(&path, "jump").unwrap())
        });
        let mut answered = 0;
        while answered < 1 {
            for r in socket.pending() {
                assert_eq!(r.command, Command::Status);
                r.answer(Ok("vm a running".into()));
                answered += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (status, bad) = client.join().unwrap();
        assert_eq!(status, "ok: vm a running");
        assert!(bad.starts_with("error: cannot read `jump`"), "{bad}");
        drop(socket);
        assert!(!path.exists(), "the socket file is removed");
        // A regular file at the path is never replaced.
        std::fs::write(&path, "keep me").unwrap();
        assert!(bind_error(&path).contains("not a socket"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).ok();
    }
}
