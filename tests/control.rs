//! The control socket of a running monitor: a real run with a real micro-VM,
//! commands sent over a real Unix socket (through the library and through
//! the `disco ctl` binary), a vCPU moved while the guest runs and its pages
//! following under a migrating policy.

mod common;

use std::time::{Duration, Instant};

use disco::control::{send, ControlSocket};
use disco::kvm_check::require_kvm;
use disco::monitor::run_with_control;

#[test]
fn a_vcpu_moved_over_the_control_socket_takes_its_pages_along() {
    if !require_kvm("a_vcpu_moved_over_the_control_socket_takes_its_pages_along") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("disco-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ctl.sock");
    let config = common::parse(
        r#"
policy = "migrate-only"
[host]
topology = "4-node"
[[vm]]
name = "mover"
vcpus = 1
node = 0
memory_mib = 8
workload = { kind = "sweep", seed = 5, passes = 3000 }
[[vm]]
name = "bystander"
node = 1
memory_mib = 2
workload = { kind = "fill", seed = 1 }
"#,
    );
    let socket = ControlSocket::bind(&path).unwrap();
    let client = std::thread::spawn({
        let path = path.clone();
        move || {
            // Wait until the mover runs.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = send(&path, "status").unwrap();
                if s.contains("mover running") {
                    break s;
                }
                assert!(Instant::now() < deadline, "mover never ran: {s}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let ctl = std::thread::spawn({
        let path = path.clone();
        move || {
            let status = client.join().unwrap();
            let cli = std::process::Command::new(env!("CARGO_BIN_EXE_disco"))
                .arg("ctl")
                .arg(&path)
                .args(["move", "nobody", "1"])
                .output()
                .unwrap();
            let cli_out = String::from_utf8_lossy(&cli.stdout).to_string();
            let errors = [
                send(&path, "move mover 4").unwrap(),
                send(&path, "move mover 1 1").unwrap(),
                send(&path, "move mover").unwrap(),
            ];
            let moved = send(&path, "move mover 3").unwrap();
            let after = send(&path, "status").unwrap();
            (status, cli.status.code(), cli_out, errors, moved, after)
        }
    });
    let report =
        run_with_control(&config, &common::run_options(), Some(&socket)).expect("the monitor runs");
    let (status, cli_code, cli_out, errors, moved, after) = ctl.join().unwrap();
    drop(socket);
    assert!(report.all_ok(), "{}", report.render_text());

    assert!(
        status.starts_with("ok: mover running vcpu nodes 0"),
        "{status}"
    );
    assert_eq!(cli_code, Some(1), "a failed command exits 1: {cli_out}");
    assert!(
        cli_out.contains("error: no VM `nobody`; the VMs are: mover, bystander"),
        "{cli_out}"
    );
    assert!(
        errors[0].contains("node 4 does not exist; allowed: 0 to 3"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("has no vCPU 1; allowed: 0 to 0"),
        "{}",
        errors[1]
    );
    assert!(errors[2].starts_with("error: cannot read"), "{}", errors[2]);
    assert!(
        moved.starts_with("ok: at ")
            && moved.contains("all vCPUs moved to node 3 (control socket)"),
        "{moved}"
    );
    assert!(after.contains("mover running vcpu nodes 3"), "{after}");

    let vm = &report.vms[0];
    assert_eq!(vm.vcpus[0].node, 3, "the report shows where the vCPU ended");
    assert!(
        vm.moves.iter().any(|m| m.contains("(control socket)")),
        "{:?}",
        vm.moves
    );
    assert!(
        vm.pages_per_node[3] >= 500,
        "pages should follow the vCPU to node 3: {:?}\n{}",
        vm.pages_per_node,
        report.render_text()
    );
    assert!(!path.exists(), "the socket file is removed after the run");
    std::fs::remove_dir_all(&dir).ok();
}

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use common::{DiscoRun, SPIN_CONFIG};

/// Ends a `DiscoRun` of `SPIN_CONFIG` with SIGINT and checks it exits.
fn interrupt(mut run: DiscoRun) {
    run.signal(libc::SIGINT);
    let code = run.wait_exit();
    assert_eq!(code, 128 + libc::SIGINT, "{}", run.stderr());
    assert!(!run.socket.exists(), "the control socket is removed");
}

/// A connection that reads reply lines with a generous limit (a reply that
/// never comes fails the test instead of hanging it).
fn connect(path: &std::path::Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn reply(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a reply line");
    line
}

/// `disco ctl SOCKET status` as user `nobody`.
fn ctl_as_nobody(socket: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(env!("CARGO_BIN_EXE_disco"))
        .arg("ctl")
        .arg(socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
fn the_socket_is_private_under_umask_000_and_other_users_are_refused() {
    if !require_kvm("the_socket_is_private_under_umask_000_and_other_users_are_refused") {
        return;
    }
    let mut run = DiscoRun::start_with("ctl-umask", SPIN_CONFIG, &[], |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            })
        };
    });
    run.wait_running("spinner");
    let mode = std::fs::metadata(&run.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o} under umask 000");
    // The test directory is world-readable: only the socket's mode stops
    // another user.
    let refused = ctl_as_nobody(&run.socket);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );
    // Even through a socket file opened up to everyone, the monitor checks
    // who connects.
    std::fs::set_permissions(&run.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = ctl_as_nobody(&run.socket);
    let out = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        out.contains("error: permission denied: uid 65534 may not control this monitor"),
        "{out}"
    );
    assert!(send(&run.socket, "status")
        .unwrap()
        .starts_with("ok: spinner running"));
    interrupt(run);
}

#[test]
fn idle_and_partial_clients_block_nobody_and_the_number_of_clients_is_bounded() {
    if !require_kvm("idle_and_partial_clients_block_nobody_and_the_number_of_clients_is_bounded") {
        return;
    }
    let mut run = DiscoRun::start("ctl-idle", SPIN_CONFIG, &[]);
    run.wait_running("spinner");
    // One client connected and silent, one in the middle of a line.
    let (_idle, _) = connect(&run.socket);
    let (mut partial, mut partial_reader) = connect(&run.socket);
    partial.write_all(b"sta").unwrap();
    // Before, `status` waited for both (send gives up after 11 s).
    assert!(send(&run.socket, "status")
        .unwrap()
        .starts_with("ok: spinner running"));
    // The partial line, completed, is answered.
    partial.write_all(b"tus\n").unwrap();
    assert!(reply(&mut partial_reader).starts_with("ok: spinner running"));

    // Up to MAX_CLIENTS at once; one more is told so and closed.
    let mut held = Vec::new();
    for _ in 2..disco::control::MAX_CLIENTS {
        held.push(connect(&run.socket));
    }
    // The listener accepts in order, so all of those count before this one.
    let (_s, mut r) = connect(&run.socket);
    let refusal = reply(&mut r);
    assert!(
        refusal.contains("16 clients are connected already; try again later"),
        "{refusal}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = send(&run.socket, "status").unwrap();
        if s.starts_with("ok:") {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    interrupt(run);
}

#[test]
fn overlong_blank_and_non_utf8_lines_get_short_errors() {
    if !require_kvm("overlong_blank_and_non_utf8_lines_get_short_errors") {
        return;
    }
    let mut run = DiscoRun::start("ctl-lines", SPIN_CONFIG, &[]);
    run.wait_running("spinner");
    let (mut s, mut r) = connect(&run.socket);
    s.write_all(b"  \t \n").unwrap();
    assert!(reply(&mut r).starts_with("error: empty command;"));
    s.write_all(b"st\xffatus\n").unwrap();
    assert!(reply(&mut r).starts_with("error: the command is not UTF-8 text;"));
    // An unknown command is echoed shortened, once.
    s.write_all(format!("fly {}\n", "x".repeat(3000)).as_bytes())
        .unwrap();
    let e = reply(&mut r);
    assert!(e.starts_with("error: cannot read `fly xxx"), "{e}");
    assert!(e.len() < 300, "{} bytes", e.len());
    // The connection still works after each error.
    s.write_all(b"status\n").unwrap();
    assert!(reply(&mut r).starts_with("ok: spinner running"));

    // 10 MB without a newline: one short error, then the monitor hangs up
    // rather than buffer it.
    let (s, mut r) = connect(&run.socket);
    let writer = std::thread::spawn(move || {
        let mut s = s;
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..10 {
            if s.write_all(&chunk).is_err() {
                return false; // the monitor closed the connection
            }
        }
        true
    });
    let e = reply(&mut r);
    assert!(
        e.starts_with("error: command longer than 4096 bytes; closing the connection"),
        "{}",
        &e[..e.len().min(200)]
    );
    assert!(e.len() < 200, "{} bytes", e.len());
    // Closed: end of file, or a reset (it closed with our bytes unread).
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing after the error"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(!writer.join().unwrap(), "the monitor stopped reading");

    assert!(send(&run.socket, "status").unwrap().starts_with("ok:"));
    interrupt(run);
}

#[test]
fn a_command_after_the_guests_finish_is_answered_at_once() {
    if !require_kvm("a_command_after_the_guests_finish_is_answered_at_once") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("disco-control-end-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ctl.sock");
    let config = common::parse(
        r#"
policy = "static"
[host]
topology = "1-node"
[[vm]]
name = "short"
memory_mib = 4
workload = { kind = "fill", seed = 2 }
"#,
    );
    let socket = ControlSocket::bind(&path).unwrap();
    // A client asking all along, through the end of the run.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = std::thread::spawn({
        let (path, done) = (path.clone(), done.clone());
        move || {
            let mut replies = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                replies.push(send(&path, "status").unwrap());
            }
            replies
        }
    });
    let report =
        run_with_control(&config, &common::run_options(), Some(&socket)).expect("the monitor runs");
    assert!(report.all_ok(), "{}", report.render_text());
    // The run is over but the socket is still there: the answer says so
    // at once instead of waiting 10 s for a monitor loop that has ended.
    let after = send(&path, "status").unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let replies = client.join().unwrap();
    assert!(
        after.starts_with("error: the run has ended; the monitor takes no more commands"),
        "{after}"
    );
    for r in &replies {
        assert!(
            r.starts_with("ok: short ") || r.starts_with("error: the run has ended"),
            "{r}"
        );
    }
    drop(socket);
    assert!(!path.exists());
    std::fs::remove_dir_all(&dir).ok();
}
