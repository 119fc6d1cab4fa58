//! The control socket of a running monitor: `disco run --control PATH`
//! listens on a Unix stream socket at PATH, and `disco ctl PATH COMMAND`
//! (or any client that writes a line, e.g. `socat - UNIX-CONNECT:PATH`)
//! sends it commands while the guests run.
//!
//! One command per line (at most [`MAX_LINE`] bytes of UTF-8), one reply
//! line per command (`ok: ...` or `error: ...`; a blank, overlong or
//! non-UTF-8 line gets an error too):
//! - `status`: each VM's name, state and the node of each of its vCPUs
//!   (reply lines joined with `; `);
//! - `move VM NODE [VCPU]`: re-pins every vCPU of VM `VM` (or only vCPU
//!   `VCPU`) to node `NODE`, as a `moves` entry of the config would; under a
//!   migrating policy the pages follow.
//!
//! The socket is mode 0600 and only clients of the monitor's uid or root
//! are served. Each client has a thread of its own (at most
//! [`MAX_CLIENTS`]), so an idle or slow client delays nobody; one that
//! sends no complete line for 30 s is disconnected.
//!
//! Client threads only parse: they hand each command to the monitor's
//! loop through a channel and wait for the answer, so every change to a VM
//! is made by the thread that owns the VMs, between two ticks of its loop.
//! Once the guests have stopped ([`ControlSocket::close`]), commands are
//! answered "the run has ended" at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
                .map_err(|_| format!("{what} `{}` is not a number; {USAGE}", shorten(w)))
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
            [first, ..] => Err(format!(
                "cannot read `{}` (`{}`...); {USAGE}",
                shorten(line.trim()),
                shorten(first)
            )),
        }
    }
}

/// `s`, cut to at most 64 characters (with `...`), for echoing a client's
/// input back in an error without repeating all of it.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
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
/// Longest command line, newline excluded. Longer input gets an error and
/// the connection is closed, so a client cannot make the monitor buffer
/// more than this.
pub const MAX_LINE: usize = 4096;
/// Clients served at once; one more is told to try again and closed.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends no complete line for this long is disconnected.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// How often a client thread looks at the stop flag while it waits for input.
const POLL: Duration = Duration::from_millis(200);
/// The reply to commands that arrive once the guests have stopped.
const ENDED: &str = "the run has ended; the monitor takes no more commands";

/// What the listener, the client threads and the monitor share.
struct Shared {
    stop: AtomicBool,
    /// The way to the monitor's loop; `None` once the run has ended
    /// ([`ControlSocket::close`]). Client threads send while holding the
    /// lock, so a request is either queued before `close` drains the queue
    /// or answered [`ENDED`] at once: none waits for a loop that is gone.
    to_monitor: Mutex<Option<mpsc::Sender<Request>>>,
    clients: AtomicUsize,
}

/// The listening socket and its threads; dropping it stops them and
/// removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    requests: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ControlSocket {
    /// Listens at `path`, mode 0600 whatever the umask (and every client's
    /// uid is checked, see [`peer_allowed`]). An existing socket file is
    /// replaced only when no monitor answers on it (a stale socket of a run
    /// that died); any other existing file is an error, so nothing is
    /// overwritten by mistake.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        let listener = bind_private(path, "control socket")?;
        listener.set_nonblocking(true)?;
        let (tx, requests) = mpsc::channel();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            to_monitor: Mutex::new(Some(tx)),
            clients: AtomicUsize::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("disco-control".into())
            .spawn({
                let shared = shared.clone();
                move || serve(listener, shared)
            })?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            requests,
            shared,
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

    /// The run has ended: commands waiting for the monitor and every later
    /// one are answered "the run has ended" at once.
    pub fn close(&self) {
        self.shared.to_monitor.lock().unwrap().take();
        for r in self.requests.try_iter() {
            r.answer(Err(ENDED.into()));
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.close();
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on a Unix socket at `path` that only its owner may use (the
/// control socket, the API's socket; `what` names it in errors): mode 0600
/// whatever the umask. An existing socket file is replaced only when no
/// monitor answers on it (a stale socket of a monitor that died); any other
/// existing file is an error, so nothing is overwritten by mistake.
pub fn bind_private(path: &Path, what: &str) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!(
                "{what} {}: the path exists and is not a socket; choose another path",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!(
                "{what} {}: another monitor is listening there",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("{what} {}: cannot listen", path.display()))?;
    // bind() creates the file with the umask's mode (0777 under
    // `umask 000`). Changing the process umask would race with other
    // threads creating files, so the mode is set right after; a client
    // that connects in between is still refused by the uid check.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{what} {}: setting mode 0600", path.display()))?;
    Ok(listener)
}

/// Whether a client may send commands: the monitor's own uid, or root.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    peer_fd_allowed(stream.as_raw_fd())
}

/// [`peer_allowed`] for a connected Unix socket given by its descriptor.
pub fn peer_fd_allowed(fd: std::os::fd::RawFd) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a `ucred` of `len` bytes on a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot tell who connected: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "permission denied: uid {} may not control this monitor (only uid {me} or root)",
            cred.uid
        ))
    }
}

/// Accepts clients and serves each on a thread of its own (at most
/// `MAX_CLIENTS`), so an idle or slow client delays nobody else.
fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        clients.retain(|c| !c.is_finished());
        match listener.accept() {
            Ok((mut stream, _)) => {
                let refused = peer_allowed(&stream).err().or_else(|| {
                    (shared.clients.load(Ordering::Relaxed) >= MAX_CLIENTS).then(|| {
                        format!("{MAX_CLIENTS} clients are connected already; try again later")
                    })
                });
                if let Some(why) = refused {
                    let _ = stream.set_write_timeout(Some(POLL));
                    let _ = stream.write_all(format!("error: {why}\n").as_bytes());
                    continue;
                }
                shared.clients.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new()
                    .name("disco-ctl-client".into())
                    .spawn({
                        let shared = shared.clone();
                        move || {
                            if let Err(e) = serve_client(stream, &shared) {
                                tracing::debug!("control client: {e:#}");
                            }
                            shared.clients.fetch_sub(1, Ordering::Relaxed);
                        }
                    });
                match spawned {
                    Ok(t) => clients.push(t),
                    Err(e) => {
                        shared.clients.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!("control socket: cannot start a client thread: {e}");
                    }
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
    for c in clients {
        let _ = c.join();
    }
}

/// Reads lines of at most `MAX_LINE` bytes and answers each.
fn serve_client(mut stream: UnixStream, shared: &Shared) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    // A client that does not read its replies must not hold its thread.
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut pending: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let mut last_line = Instant::now();
    loop {
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let reply = answer_line(&line[..end], shared);
            stream.write_all(reply.as_bytes())?;
            last_line = Instant::now();
        }
        if pending.len() > MAX_LINE {
            stream.write_all(
                format!(
                    "error: command longer than {MAX_LINE} bytes; closing the connection; {USAGE}\n"
                )
                .as_bytes(),
            )?;
            return Ok(());
        }
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if last_line.elapsed() > IDLE_LIMIT {
            stream.write_all(
                format!(
                    "error: no complete command for {} s; closing the connection\n",
                    IDLE_LIMIT.as_secs()
                )
                .as_bytes(),
            )?;
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                // A last command without its newline is still answered.
                if !pending.is_empty() {
                    let reply = answer_line(&pending, shared);
                    stream.write_all(reply.as_bytes())?;
                }
                return Ok(());
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The reply line (`ok: ...\n` or `error: ...\n`) to one command line.
fn answer_line(line: &[u8], shared: &Shared) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let answer = if line.len() > MAX_LINE {
        Err(format!("command longer than {MAX_LINE} bytes; {USAGE}"))
    } else {
        match std::str::from_utf8(line) {
            Err(_) => Err(format!("the command is not UTF-8 text; {USAGE}")),
            Ok(text) => Command::parse(text).and_then(|command| ask_monitor(command, shared)),
        }
    };
    match answer {
        Ok(s) => format!("ok: {s}\n"),
        Err(s) => format!("error: {s}\n"),
    }
}

/// Hands `command` to the monitor's loop and waits for its answer.
fn ask_monitor(command: Command, shared: &Shared) -> Result<String, String> {
    let (reply, answer) = mpsc::channel();
    {
        let to_monitor = shared.to_monitor.lock().unwrap();
        let Some(tx) = to_monitor.as_ref() else {
            return Err(ENDED.into());
        };
        if tx.send(Request { command, reply }).is_err() {
            return Err(ENDED.into());
        }
    }
    match answer.recv_timeout(ANSWER_LIMIT) {
        Ok(a) => a,
        // `close` dropped the request unanswered, or answered it.
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ENDED.into()),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err("the monitor did not answer within 10 s (it is busy); try again".into())
        }
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
