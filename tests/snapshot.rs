//! Snapshots, restores and clones of micro-VMs on real KVM: a guest
//! snapshotted mid-run and restored (in the same monitor or another) ends
//! with the host model's checksum; clones of one snapshot share every page
//! from the start; damaged files are refused and leave nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disco::config::VmConfig;
use disco::kvm_check::require_kvm;
use disco::monitor::{AfterSnapshot, Monitor, RestoreOptions};
use disco::report::VmReport;
use disco::vm::VcpuOutcome;

fn monitor() -> Monitor {
    let topology = disco::topology::Topology::from_fixture_name("1-node").unwrap();
    let policy = disco::config::load_policy("static", Path::new(".")).unwrap();
    let mut m = Monitor::new(topology, policy, "<test>", Duration::from_millis(200)).unwrap();
    m.start_services(0).unwrap();
    m
}

/// One micro-VM's config (1-node fixture).
fn vm(name: &str, vcpus: usize, memory_mib: u64, workload: &str) -> VmConfig {
    let nodes = vec!["0"; vcpus].join(", ");
    let text = format!(
        "policy = \"static\"\n[host]\ntopology = \"1-node\"\n[[vm]]\nname = \"{name}\"\n\
         vcpu_nodes = [{nodes}]\nmemory_mib = {memory_mib}\ntime_limit_s = 120\nworkload = {workload}\n"
    );
    common::parse(&text).vms.remove(0)
}

/// A directory of its own under the temp dir, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("disco-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until the monitor's VMs have made some progress but not all.
fn wait_mid_run(m: &mut Monitor, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        m.tick();
        let (done, total, finished, _) = m.progress();
        assert_eq!(
            finished, 0,
            "the guest finished before the snapshot: make it longer"
        );
        if done as f64 >= at_least * total as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "no progress: {done}/{total}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_checksums(report: &VmReport) {
    assert_eq!(report.status, "ok", "{}: {:?}", report.name, report.error);
    for v in &report.vcpus {
        match &v.outcome {
            VcpuOutcome::Done { result, expected } => {
                assert_eq!(Some(*result), *expected, "{} vcpu{}", report.name, v.index)
            }
            other => panic!("{} vcpu{} did not finish: {other:?}", report.name, v.index),
        }
    }
}

/// Snapshots `vc` mid-run (stopping it), restores it as `<name>-restored`
/// in the same monitor and checks the restored guest's checksums.
fn snapshot_and_restore(vc: VmConfig) {
    let dir = Dir::new(&vc.name);
    let path = dir.file("vm.snap");
    let mut m = monitor();
    m.add_vm(&vc).unwrap();
    wait_mid_run(&mut m, 0.2);
    let snap = m.snapshot_vm(&vc.name, &path, AfterSnapshot::Stop).unwrap();
    assert!(path.is_file());
    let (done, total) = snap.progress;
    assert!(done > 0 && done < total, "mid-run: {done}/{total}");
    assert!(snap.file.pages > 0 && snap.file.pages <= snap.file.frames);
    let stopped = m.wait_vm(&vc.name).unwrap();
    assert_eq!(stopped.status, "stopped", "{stopped:?}");
    m.remove(&vc.name).unwrap();
    m.memory().verify().unwrap();

    let name = format!("{}-restored", vc.name);
    let restored = m
        .restore_vm(
            &path,
            &RestoreOptions {
                name: name.clone(),
                ..RestoreOptions::default()
            },
        )
        .unwrap();
    assert_eq!(restored.names, std::slice::from_ref(&name));
    m.memory().verify().unwrap();
    let report = m.wait_vm(&name).unwrap();
    assert_checksums(&report);
    assert!(
        report.run_ms >= snap.paused_ms.min(1.0),
        "the run time counts the time before the snapshot"
    );
    m.memory().verify().unwrap();
    m.remove(&name).unwrap();
    assert_eq!(common::used_pages(&m), 0, "every page back in the pools");
}

#[test]
fn single_vcpu_sweep_snapshot_restore() {
    if !require_kvm("single_vcpu_sweep_snapshot_restore") {
        return;
    }
    snapshot_and_restore(vm(
        "sweep1",
        1,
        32,
        "{ kind = \"sweep\", seed = 11, passes = 40 }",
    ));
}

#[test]
fn multi_vcpu_counters_snapshot_restore() {
    if !require_kvm("multi_vcpu_counters_snapshot_restore") {
        return;
    }
    snapshot_and_restore(vm(
        "counters2",
        2,
        16,
        "{ kind = \"counters\", counters = 16, increments = 3000000 }",
    ));
}

#[test]
fn restore_in_a_second_monitor() {
    if !require_kvm("restore_in_a_second_monitor") {
        return;
    }
    let dir = Dir::new("second");
    let path = dir.file("vm.snap");
    let vc = vm(
        "random2",
        2,
        32,
        "{ kind = \"random\", seed = 12, touches = 20000000 }",
    );
    let mut first = monitor();
    first.add_vm(&vc).unwrap();
    wait_mid_run(&mut first, 0.1);
    first
        .snapshot_vm(&vc.name, &path, AfterSnapshot::Resume)
        .unwrap();
    // The original goes on after the snapshot and finishes right too.
    let original = first.wait_vm(&vc.name).unwrap();
    assert_checksums(&original);

    let mut second = monitor();
    second
        .restore_vm(
            &path,
            &RestoreOptions {
                name: "random2".into(),
                ..RestoreOptions::default()
            },
        )
        .unwrap();
    let report = second.wait_vm("random2").unwrap();
    assert_checksums(&report);
    second.memory().verify().unwrap();
    first.memory().verify().unwrap();
}

#[test]
fn sixteen_clones_share_one_copy() {
    if !require_kvm("sixteen_clones_share_one_copy") {
        return;
    }
    let dir = Dir::new("clones");
    let path = dir.file("vm.snap");
    // A sweep of a 32 MiB guest, snapshotted once its fill is done and
    // the sweeps are under way: the clones then rewrite every data page.
    let vc = vm(
        "origin",
        1,
        32,
        "{ kind = \"sweep\", seed = 13, passes = 12 }",
    );
    let mut m = monitor();
    m.add_vm(&vc).unwrap();
    wait_mid_run(&mut m, 0.3);
    let snap = m.snapshot_vm("origin", &path, AfterSnapshot::Stop).unwrap();
    m.wait_vm("origin").unwrap();
    m.remove("origin").unwrap();
    assert_eq!(common::used_pages(&m), 0);

    let names: Vec<String> = (0..16).map(|i| format!("clone{i}")).collect();
    let report = m.clone_vms(&path, &names, &[0]).unwrap();
    assert_eq!(report.names, names);
    assert_eq!(
        report.pages_per_node,
        [snap.file.pages],
        "one copy on node 0"
    );
    assert_eq!(report.frames_mapped, 16 * snap.file.frames_stored);
    // Right after the load (the clones may have started writing): one
    // copy of the image, the frames it left out (fresh pages, holes in
    // the pool until written) and what copy-on-write broke so far.
    m.memory().verify().unwrap();
    let holes = snap.file.frames - snap.file.frames_stored;
    let breaks_at_load = m.memory().sharing_stats().cow_breaks;
    let used = common::used_pages(&m);
    assert!(
        used <= snap.file.pages + 16 * holes + breaks_at_load,
        "{used} pages used, more than one copy ({}) + 16 x {holes} fresh + {breaks_at_load} copies",
        snap.file.pages
    );
    // Every page of the image is shared by the 16 clones.
    let memory = m.memory().clone();
    let (space, _) = m.space_of("clone0").unwrap();
    let first = memory
        .pmap_chunk(space, 0..snap.file.frames)
        .unwrap()
        .into_iter()
        .find(|f| f.flags.shared)
        .expect("a shared frame");
    assert!(first.flags.write_protected);
    let owners = memory.memmap_chunk(first.page.node(), first.page.index..first.page.index + 1);
    assert!(owners[0].refcount >= 16, "refcount {}", owners[0].refcount);
    for name in &names {
        let r = m.wait_vm(name).unwrap();
        assert_checksums(&r);
    }
    m.memory().verify().unwrap();
    let stats = m.memory().sharing_stats();
    assert_eq!(
        common::used_pages(&m),
        snap.file.pages + 16 * holes + stats.cow_breaks,
        "pages in use: one copy, the fresh frames and one page per copy-on-write break"
    );
    for name in &names {
        m.remove(name).unwrap();
    }
    m.memory().verify().unwrap();
    assert_eq!(common::used_pages(&m), 0);
}

/// A damaged copy of `good` (made by `damage`) at `dir/name`.
fn damaged(dir: &Dir, good: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(good).unwrap();
    damage(&mut bytes);
    let path = dir.file(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_files_are_refused_and_leave_nothing() {
    if !require_kvm("bad_files_are_refused_and_leave_nothing") {
        return;
    }
    let dir = Dir::new("bad");
    let good = dir.file("good.snap");
    let mut m = monitor();
    let vc = vm(
        "source",
        2,
        16,
        "{ kind = \"sweep\", seed = 14, passes = 60 }",
    );
    m.add_vm(&vc).unwrap();
    wait_mid_run(&mut m, 0.1);
    // A snapshot into a directory that does not exist fails and leaves
    // the VM running.
    let e = m
        .snapshot_vm(
            "source",
            &dir.file("no/such/dir.snap"),
            AfterSnapshot::Resume,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no/such/dir.snap"), "{e}");
    let snap = m
        .snapshot_vm("source", &good, AfterSnapshot::Resume)
        .unwrap();
    assert!(
        snap.file.pages > 256,
        "more than one block: {}",
        snap.file.pages
    );
    let len = std::fs::metadata(&good).unwrap().len() as usize;
    assert_eq!(len as u64, snap.file.bytes);
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["good.snap"], "no temporary file left");

    let cases: Vec<(PathBuf, &str)> = vec![
        (
            damaged(&dir, &good, "half.snap", |b| b.truncate(len / 2)),
            "truncated",
        ),
        (
            damaged(&dir, &good, "no-end.snap", |b| b.truncate(len - 24)),
            "truncated",
        ),
        (
            damaged(&dir, &good, "header.snap", |b| b.truncate(12)),
            "truncated",
        ),
        (
            // The first block's index length (after the 20-byte header and
            // the metadata) made larger than the file: a wrong length, not
            // a cut (the file still ends with its end marker).
            damaged(&dir, &good, "length.snap", |b| {
                let meta = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
                let at = 20 + meta + 8;
                b[at..at + 4].copy_from_slice(&(60u32 << 20).to_le_bytes());
            }),
            "corrupted: block 1 (pages 0..) runs past the end of the file",
        ),
        (
            damaged(&dir, &good, "flipped.snap", |b| b[len - 3000] ^= 0x40),
            "checksum of block",
        ),
        (
            damaged(&dir, &good, "meta.snap", |b| b[40] ^= 1),
            "metadata's checksum",
        ),
        (
            damaged(&dir, &good, "version.snap", |b| b[8] = 3),
            "version 3, this disco reads version 2",
        ),
        (
            damaged(&dir, &good, "tail.snap", |b| b.extend_from_slice(b"x")),
            "data after the end marker",
        ),
        (
            damaged(&dir, &good, "foreign.snap", |b| {
                *b = b"[[vm]]\nname = \"not a snapshot\"\n".to_vec()
            }),
            "not a disco snapshot",
        ),
        (dir.0.clone(), "is a directory"),
    ];
    let before = common::used_pages(&m);
    for (path, phrase) in &cases {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let restore = m.restore_vm(
            path,
            &RestoreOptions {
                name: "restored".into(),
                ..RestoreOptions::default()
            },
        );
        let names: Vec<String> = (0..3).map(|i| format!("clone{i}")).collect();
        let clone = m.clone_vms(path, &names, &[0]);
        for (what, result) in [
            ("restore", restore.map(|_| ())),
            ("clone", clone.map(|_| ())),
        ] {
            let e = result
                .err()
                .unwrap_or_else(|| panic!("{what} of {file} was accepted"))
                .to_string();
            assert!(
                e.contains(&file) && e.contains(phrase),
                "{what} of {file}: expected the file and `{phrase}` in: {e}"
            );
        }
        assert!(m.space_of("restored").is_none() && m.space_of("clone0").is_none());
        assert_eq!(common::used_pages(&m), before, "{file}: pool pages taken");
        m.memory().verify().unwrap();
    }
    // The good file still restores.
    m.restore_vm(
        &good,
        &RestoreOptions {
            name: "restored".into(),
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    assert_checksums(&m.wait_vm("restored").unwrap());
    assert_checksums(&m.wait_vm("source").unwrap());
    m.memory().verify().unwrap();
}
