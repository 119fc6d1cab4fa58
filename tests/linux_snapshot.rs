//! Snapshots of a booting Linux guest (the Debian kernel fetched by
//! scripts/fetch-linux-guest.sh) on real KVM, through the monitor.
//!
//! `a_booting_linux_guest_restored_from_a_snapshot_prints_what_the_original_printed`:
//! a 2-vCPU, 2-node, 256 MiB guest is snapshotted mid-boot (the boot vCPU
//! running the kernel, the second waiting for its start-up IPI) and left
//! running; the snapshot is restored in a second monitor. The restored
//! guest must print, line for line (timestamps aside), what the original
//! printed after the snapshot up to the SRAT's NUMA nodes: ACPI tables read
//! from its memory, the irqchip, clock and serial port carried over. Two
//! clones of the snapshot in the first monitor, sharing one loaded copy,
//! must print it too. This
//! runs on the build hosts whose KVM emulates guest kernel mode
//! (FACTS.md): the early boot is slow there but far enough in 60 s.
//!
//! `a_linux_guest_with_a_writable_disk_is_refused`: its snapshot is refused
//! with the reason, and it runs on.
//!
//! `a_restore_refuses_a_read_only_disk_changed_since_the_snapshot`: the
//! restore names the disk, and leaves no VM and no page behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disco::config::VmConfig;
use disco::kvm_check::require_kvm;
use disco::monitor::{AfterSnapshot, Monitor, RestoreOptions};

/// The line the snapshot is taken after (early in setup_arch).
const SNAPSHOT_AFTER: &str = "x86/PAT: Configuration";
/// The last line compared: the SRAT's second node, read from guest memory.
const LAST_LINE: &str = "NODE_DATA(1) allocated";

fn monitor() -> Monitor {
    let topology = disco::topology::Topology::from_fixture_name("2-socket").unwrap();
    let policy = disco::config::load_policy("static", Path::new(".")).unwrap();
    let mut m = Monitor::new(topology, policy, "<test>", Duration::from_millis(200)).unwrap();
    m.start_services(0).unwrap();
    m
}

fn linux_vm(name: &str, serial: &Path, extra: &str) -> VmConfig {
    let text = format!(
        r#"
[host]
topology = "2-socket"
[[vm]]
name = "{name}"
vcpu_nodes = [0, 1]
memory_mib = 256
kernel = "{}"
serial = "{}"
time_limit_s = 600
{extra}
"#,
        common::linux_guest_dir().join("vmlinux").display(),
        serial.display()
    );
    common::parse(&text).vms.remove(0)
}

/// Ticks the monitor until `file` holds `text` on a finished line (the
/// serial port writes a byte per exit, so a line can be read half-done);
/// panics after `limit`.
fn wait_for(m: &mut Monitor, file: &Path, text: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        m.tick();
        let got = std::fs::read_to_string(file).unwrap_or_default();
        if got.find(text).is_some_and(|at| got[at..].contains('\n')) {
            return got;
        }
        assert!(
            start.elapsed() < limit,
            "no `{text}` in {} after {limit:?}:\n{got}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whole lines of `text` from the first full line on, up to the one
/// holding `last`, with the printk timestamps (`[    7.289354] `) taken
/// off: times differ between runs, messages must not.
fn messages(text: &str, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let line = line.trim_end_matches('\r');
        let message = match (line.starts_with('['), line.find("] ")) {
            (true, Some(end)) => &line[end + 2..],
            _ => line,
        };
        out.push(message.to_string());
        if line.contains(last) {
            return out;
        }
    }
    panic!("no `{last}` in:\n{text}");
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d =
            std::env::temp_dir().join(format!("disco-linux-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_booting_linux_guest_restored_from_a_snapshot_prints_what_the_original_printed() {
    if !require_kvm(
        "a_booting_linux_guest_restored_from_a_snapshot_prints_what_the_original_printed",
    ) {
        return;
    }
    let dir = Dir::new("boot");
    let serial = dir.0.join("lx.log");
    let snap = dir.0.join("lx.snap");
    let mut m = monitor();
    m.add_vm(&linux_vm("lx", &serial, "")).unwrap();
    wait_for(&mut m, &serial, SNAPSHOT_AFTER, Duration::from_secs(300));
    let report = m
        .snapshot_vm("lx", &snap, AfterSnapshot::Resume)
        .expect("snapshot of a running Linux guest");
    // Everything printed before the snapshot was written to the file as it
    // came (the sink writes unbuffered), so this is where the restored
    // guest's output starts.
    let before = std::fs::read(&serial).unwrap().len();
    eprintln!(
        "snapshot: {} pages, {} bytes, VM held {:.1} ms, console at byte {before}",
        report.file.pages, report.file.bytes, report.paused_ms
    );
    assert!(report.file.pages > 1000, "the kernel's pages: {report:?}");
    let report_pages = report.file.pages;

    let original = wait_for(&mut m, &serial, LAST_LINE, Duration::from_secs(600));
    m.stop("lx", "the test has what it needs").unwrap();
    let stopped = m.wait_vm("lx").unwrap();
    assert_eq!(stopped.status, "stopped", "{stopped:?}");
    m.remove("lx").unwrap();
    m.memory().verify().expect("invariants after the original");

    // Restored in a second monitor (its own pools, as another process's).
    let mut m2 = monitor();
    let restored = m2
        .restore_vm(
            &snap,
            &RestoreOptions {
                name: "lx-restored".into(),
                ..RestoreOptions::default()
            },
        )
        .expect("restoring the Linux guest");
    assert_eq!(restored.names, ["lx-restored"]);
    eprintln!("restored in {:.1} ms", restored.elapsed_ms);
    // Its console goes beside the original's file, under its own name.
    let restored_serial = dir.0.join("lx-restored.lx.log");
    let after = wait_for(
        &mut m2,
        &restored_serial,
        LAST_LINE,
        Duration::from_secs(600),
    );
    m2.stop("lx-restored", "the test has what it needs")
        .unwrap();
    let report = m2.wait_vm("lx-restored").unwrap();
    assert_eq!(report.status, "stopped", "{report:?}");
    assert!(
        report.log.iter().any(|l| l.contains(LAST_LINE)),
        "the report's console lines: {:?}",
        report.log
    );
    m2.remove("lx-restored").unwrap();
    m2.memory()
        .verify()
        .expect("invariants after the restored guest");

    // Two clones of the same snapshot: each page loaded once, both go on.
    let clones = m
        .clone_vms(&snap, &["lx-c0".into(), "lx-c1".into()], &[])
        .expect("cloning the Linux guest");
    eprintln!("two clones in {:.1} ms", clones.elapsed_ms);
    let loaded: u64 = clones.pages_per_node.iter().sum();
    assert!(
        loaded <= report_pages && clones.frames_mapped >= 2 * report_pages,
        "one copy loaded for two clones: {clones:?}"
    );
    let mut clone_texts = Vec::new();
    for name in ["lx-c0", "lx-c1"] {
        let file = dir.0.join(format!("{name}.lx.log"));
        clone_texts.push(wait_for(&mut m, &file, LAST_LINE, Duration::from_secs(600)));
    }
    for name in ["lx-c0", "lx-c1"] {
        m.stop(name, "the test has what it needs").unwrap();
        assert_eq!(m.wait_vm(name).unwrap().status, "stopped");
        m.remove(name).unwrap();
    }
    m.memory().verify().expect("invariants after the clones");

    let want = messages(&original[before..], LAST_LINE);
    for text in &clone_texts {
        assert_eq!(messages(text, LAST_LINE), want, "a clone's console");
    }
    let got = messages(&after, LAST_LINE);
    eprintln!("---- restored console ----\n{after}\n---- end ----");
    assert!(
        want.len() >= 10,
        "too little output after the snapshot to compare: {want:?}"
    );
    assert_eq!(
        got, want,
        "the restored guest printed something else than the original after the snapshot"
    );
    assert!(
        want.iter()
            .any(|l| l.contains("SRAT: PXM 1 -> APIC 0x01 -> Node 1")),
        "{want:?}"
    );
}

/// A monitor running VM `lx` with a copy of the test disk (read-only or
/// not) in `dir`: (monitor, disk, serial file, snapshot path).
fn with_disk(dir: &Dir, read_only: bool) -> (Monitor, PathBuf, PathBuf, PathBuf) {
    let disk = dir.0.join("disk.img");
    std::fs::copy(common::linux_guest_dir().join("disk.img"), &disk).unwrap();
    let serial = dir.0.join("lx.log");
    let mut m = monitor();
    let vc = linux_vm(
        "lx",
        &serial,
        &format!(
            "disk = [{{ path = \"{}\", read_only = {read_only} }}]",
            disk.display()
        ),
    );
    m.add_vm(&vc).unwrap();
    (m, disk, serial, dir.0.join("lx.snap"))
}

#[test]
fn a_linux_guest_with_a_writable_disk_is_refused() {
    if !require_kvm("a_linux_guest_with_a_writable_disk_is_refused") {
        return;
    }
    let dir = Dir::new("disk");
    let (mut m, _, serial, snap) = with_disk(&dir, false);
    let e = m
        .snapshot_vm("lx", &snap, AfterSnapshot::Resume)
        .expect_err("a writable disk is refused");
    let text = e.to_string();
    assert!(
        text.contains("is writable") && text.contains("read_only = true"),
        "{text}"
    );
    assert!(!snap.exists(), "no file is left");
    assert!(
        std::fs::read_dir(&dir.0).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")),
        "no partial file is left"
    );
    // It runs on: its console keeps growing.
    wait_for(&mut m, &serial, "Linux version", Duration::from_secs(120));
    assert!(!m.has_exited("lx"));
    m.stop("lx", "done").unwrap();
    m.wait_vm("lx").unwrap();
}

#[test]
fn a_restore_refuses_a_read_only_disk_changed_since_the_snapshot() {
    if !require_kvm("a_restore_refuses_a_read_only_disk_changed_since_the_snapshot") {
        return;
    }
    let dir = Dir::new("ro-disk");
    let (mut m, disk, serial, snap) = with_disk(&dir, true);
    wait_for(&mut m, &serial, "Linux version", Duration::from_secs(120));
    m.snapshot_vm("lx", &snap, AfterSnapshot::Stop)
        .expect("a VM with read-only disks is snapshotted");
    assert_eq!(m.wait_vm("lx").unwrap().status, "stopped");
    m.remove("lx").unwrap();
    let before = common::used_pages(&m);

    // The disk grows by a sector: the restore is refused, and nothing of
    // the VM is left.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&disk, &bytes).unwrap();
    let e = m
        .restore_vm(
            &snap,
            &RestoreOptions {
                name: "again".into(),
                ..RestoreOptions::default()
            },
        )
        .expect_err("a changed disk is refused");
    assert!(
        matches!(e, disco::monitor::AddError::Snapshot(_)),
        "the snapshot's fault, not the host's (the API answers 422): {e:?}"
    );
    let text = format!("{e:#}");
    assert!(
        text.contains("changed since the snapshot") && text.contains("disk.img"),
        "{text}"
    );
    assert!(m.space_of("again").is_none(), "no VM is left");
    assert_eq!(common::used_pages(&m), before, "no page is kept");
    m.memory().verify().unwrap();
}
