//! Helpers shared by the integration tests that run the whole monitor.
//! Each test crate uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use disco::config::Config;
use disco::monitor::{run, RunOptions};
use disco::report::RunReport;

/// No progress line; `Memory::verify` every 20 ms while the guests run.
pub fn run_options() -> RunOptions {
    RunOptions {
        progress: false,
        verify_every: Duration::from_millis(20),
        ..RunOptions::default()
    }
}

/// Parses an inline config (paths relative to the current directory).
pub fn parse(text: &str) -> Config {
    Config::parse(text, "<test>", Path::new(".")).expect("test config is valid")
}

/// Runs an inline config with [`run_options`]; the VMs may fail (the
/// caller checks the report), the monitor itself must not.
pub fn run_config(text: &str) -> RunReport {
    run(&parse(text), &run_options()).expect("the monitor runs")
}

/// A replayed-trace file in a directory of its own under the temp dir,
/// removed when dropped (also when the test fails).
pub struct TraceFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TraceFile {
    /// Writes `text` (the format of `disco::numa::trace`) to `<name>.trace`.
    pub fn new(name: &str, text: &str) -> TraceFile {
        TraceFile::named(name, &format!("{name}.trace"), text)
    }

    /// Writes `text` to a file called `file_name` (e.g. a policy file).
    pub fn named(name: &str, file_name: &str, text: &str) -> TraceFile {
        let dir = std::env::temp_dir().join(format!("disco-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file_name);
        std::fs::write(&path, text).unwrap();
        TraceFile { dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TraceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates a FIFO (named pipe) at `path`: opening it for reading blocks
/// until a writer comes, so it stands for every input that could hang.
pub fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Runs `f` on a thread and returns its result, failing the test if it has
/// not ended within 30 s: a regression that hangs (reading a FIFO) then
/// fails with `what` instead of hanging the test run.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not end within 30 s")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what} panicked (see above)")
        }
    }
}
