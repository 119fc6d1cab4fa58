//! The `disco` binary's standard output when nobody reads it or it cannot
//! be written: a reader that went away (`disco check X | head -1`) ends the
//! command quietly, a full device (`disco run > /dev/full`) is one error
//! line on stderr and a non-zero status; never a panic (exit 101).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn demo_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/demo.toml")
        .display()
        .to_string()
}

/// Runs `disco args` with stdout going to `stdout`.
fn disco(args: &[&str], stdout: Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_disco"))
        .args(args)
        .env("DISCO_LOG", "warn")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("the disco binary runs")
}

/// The write end of a pipe whose read end is already closed: every write
/// fails with EPIPE (Rust ignores SIGPIPE, so the process sees the error).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe(2) returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
    Stdio::from(unsafe { OwnedFd::from_raw_fd(fds[1]) })
}

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_reader_that_went_away_ends_the_output_quietly() {
    let config = demo_config();
    for args in [
        vec!["check", config.as_str()],
        vec!["default-config"],
        vec!["topo", "--fixture", "4-node"],
        vec!["bench", "list"],
    ] {
        let o = disco(&args, closed_pipe());
        assert_eq!(
            o.status.code(),
            Some(0),
            "disco {args:?} into a closed pipe: {}",
            stderr(&o)
        );
        assert_eq!(stderr(&o), "", "disco {args:?}: nothing on stderr");
    }
}

#[test]
fn a_full_stdout_is_one_error_line_and_a_failure() {
    let config = demo_config();
    for args in [vec!["check", config.as_str()], vec!["default-config"]] {
        let o = disco(&args, dev_full());
        assert_eq!(o.status.code(), Some(2), "disco {args:?} > /dev/full");
        assert_eq!(
            stderr(&o),
            "disco: error: cannot write to stdout: No space left on device (os error 28)\n",
            "disco {args:?} > /dev/full"
        );
    }
}

#[test]
fn a_run_into_a_closed_pipe_or_a_full_device_does_not_panic() {
    if !disco::kvm_check::require_kvm("a_run_into_a_closed_pipe_or_a_full_device_does_not_panic") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("disco-cli-output-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(
        &config,
        "policy = \"static\"\n[[vm]]\nname = \"t\"\nmemory_mib = 2\nworkload = { kind = \"fill\", seed = 3 }\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let o = disco(&["run", "--quiet", &config], closed_pipe());
    assert_eq!(
        o.status.code(),
        Some(0),
        "run into a closed pipe: {}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let o = disco(&["run", "--quiet", &config], dev_full());
    assert_eq!(o.status.code(), Some(2), "run > /dev/full: {}", stderr(&o));
    assert!(
        stderr(&o).ends_with(
            "disco: error: cannot write to stdout: No space left on device (os error 28)\n"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}
