//! Helpers shared by the integration tests: running the whole monitor,
//! and guests on hand-made guest spaces.
//! Each test crate uses only some of them.
#![allow(dead_code)]

pub mod serve;

use std::path::{Path, PathBuf};
use std::time::Duration;

use disco::config::Config;
use disco::guest::Workload;
use disco::memory::{Memory, VmId};
use disco::monitor::{run, RunOptions};
use disco::report::RunReport;
use disco::vm::{GuestRam, MicroVm, MicroVmSpec, VcpuPlacement};
use disco::PAGE_SIZE;

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

/// A `disco run` of the built binary, in the background, with a control
/// socket; stdout and stderr go to files in a directory of its own, removed
/// when dropped (the process is killed then if it still runs).
pub struct DiscoRun {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: std::process::Child,
}

/// A config whose `spinner` VM runs until stopped (time limit 120 s) and
/// whose `quick` VM finishes at once.
pub const SPIN_CONFIG: &str = r#"
policy = "static"
[host]
topology = "1-node"
[[vm]]
name = "spinner"
memory_mib = 4
time_limit_s = 120
workload = { kind = "spin" }
[[vm]]
name = "quick"
memory_mib = 4
workload = { kind = "fill", seed = 1 }
"#;

impl DiscoRun {
    /// Starts `disco run CONFIG --quiet --control SOCKET ARGS...`; `setup`
    /// may change the command (e.g. its umask) before it starts.
    pub fn start_with(
        name: &str,
        config: &str,
        args: &[&str],
        setup: impl FnOnce(&mut std::process::Command),
    ) -> DiscoRun {
        let dir = std::env::temp_dir().join(format!("disco-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let socket = dir.join("ctl.sock");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_disco"));
        cmd.arg("run")
            .arg(&config_path)
            .arg("--quiet")
            .arg("--control")
            .arg(&socket)
            .args(args)
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        setup(&mut cmd);
        let child = cmd.spawn().expect("starting disco run");
        DiscoRun { dir, socket, child }
    }

    pub fn start(name: &str, config: &str, args: &[&str]) -> DiscoRun {
        DiscoRun::start_with(name, config, args, |_| {})
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until `status` over the socket says `vm` is running.
    pub fn wait_running(&mut self, vm: &str) {
        self.wait_status(&[&format!("{vm} running")]);
    }

    /// Waits until the reply to `status` over the socket contains every
    /// one of `parts` (e.g. `"spinner running"`, `"quick finished"`).
    pub fn wait_status(&mut self, parts: &[&str]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = disco::control::send(&self.socket, "status") {
                if parts.iter().all(|p| s.contains(p)) {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "disco run ended ({status}) before status showed {parts:?}: {}",
                    self.stderr()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "status never showed {parts:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the monitor.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the monitor to exit (a generous limit: it must not hang)
    /// and returns its exit code, or 128 + signal if a signal killed it.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("disco run did not exit within 60 s: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for DiscoRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A store through a guest space's mapping at `base`, as a guest write: on
/// a protected page it blocks until the fault handler gives this frame its
/// own copy.
pub fn guest_write(base: usize, gfn: u64, value: u8) {
    // SAFETY: the frame is mapped read-write for the life of the space.
    unsafe {
        std::ptr::write_bytes(
            (base + gfn as usize * PAGE_SIZE) as *mut u8,
            value,
            PAGE_SIZE,
        )
    };
}

/// A load through a guest space's mapping (what a vCPU sees).
pub fn guest_read(base: usize, gfn: u64) -> Vec<u8> {
    // SAFETY: as above; reading a mapped frame.
    unsafe {
        std::slice::from_raw_parts((base + gfn as usize * PAGE_SIZE) as *const u8, PAGE_SIZE)
            .to_vec()
    }
}

/// A 2-vCPU micro-VM (node 0) on guest space `space` of `frames` frames at
/// `base`, its pauser registered with the memory (merges pause it).
pub fn micro_vm_on_space(
    kvm: &kvm_ioctls::Kvm,
    memory: &Memory,
    (space, base): (VmId, usize),
    frames: u64,
    name: String,
    workload: Workload,
    time_limit: Duration,
) -> MicroVm {
    let spec = MicroVmSpec {
        name,
        vcpus: (0..2)
            .map(|_| VcpuPlacement {
                node: 0,
                host_cpus: vec![],
            })
            .collect(),
        workload,
        time_limit,
    };
    let ram = GuestRam {
        host_addr: base,
        size: frames as usize * PAGE_SIZE,
    };
    let vm = MicroVm::create(kvm, spec, ram).unwrap();
    memory.set_pauser(space, vm.pauser()).unwrap();
    vm
}

/// The end of a random-sequence test: destroys every space of `ids`,
/// checks the memory invariants (`verify`), and returns how many machine
/// pages the pools still hand out (0 when every page came back once).
pub fn destroy_all(memory: &Memory, ids: impl IntoIterator<Item = VmId>) -> anyhow::Result<u32> {
    for id in ids {
        memory.destroy_space(id)?;
    }
    memory.verify()?;
    Ok(memory.pool_stats().iter().map(|p| p.used_pages).sum())
}

/// Where scripts/fetch-linux-guest.sh put the kernel, initramfs and disk.
pub fn linux_guest_dir() -> PathBuf {
    let dir = std::env::var_os("DISCO_LINUX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/linux-guest"));
    for f in ["vmlinux", "bzImage", "initramfs.cpio.gz", "disk.img"] {
        assert!(
            dir.join(f).exists(),
            "{} is missing: run scripts/fetch-linux-guest.sh (scripts/test.sh does) to fetch \
             the Debian kernel and build the initramfs",
            dir.join(f).display()
        );
    }
    dir
}

/// Pool pages a monitor has handed out, over all nodes.
pub fn used_pages(m: &disco::monitor::Monitor) -> u64 {
    m.memory()
        .pool_stats()
        .iter()
        .map(|p| p.used_pages as u64)
        .sum()
}
