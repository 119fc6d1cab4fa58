//! Host settings disco changes system-wide are put back: KSM's settings
//! that a `disco bench sharing` killed with SIGKILL left behind, and
//! `vm.max_map_count` raised by a monitor, when the monitor's memory goes
//! (normal end, error, signal) or, after SIGKILL, at the next `disco` start.
//!
//! These tests change the real host settings (and put them back): they
//! need root, and the KSM test `/sys/kernel/mm/ksm`; without them they fail
//! with a clear message.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use disco::bench::ksm::{Ksm, KsmSetting, KsmSettings};
use disco::leftovers::{state_dir, MAP_COUNT_STATE};
use disco::memory::Memory;

const MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

/// The tests read and write the same host settings: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn map_count() -> u64 {
    std::fs::read_to_string(MAP_COUNT)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An exclusive `flock` on a lock file of the state directory, as disco
/// takes it, so no other disco acts on the state while a test sets it up.
fn flock(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir().join(name))
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
    file
}

/// Runs `disco default-config` (any command restores leftovers at start)
/// and returns its stderr.
fn any_disco_start() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disco"))
        .arg("default-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Puts KSM back as it was if the test fails half-way.
struct RestoreKsm<'a>(&'a Ksm, KsmSettings);

impl Drop for RestoreKsm<'_> {
    fn drop(&mut self) {
        if self.0.settings().ok().as_ref() != Some(&self.1) {
            let _ = self.0.restore(&self.1);
        }
    }
}

#[test]
fn ksm_left_running_by_a_killed_bench_is_restored_at_any_start() {
    let _serial = serial();
    let ksm = Ksm::system().unwrap_or_else(|e| {
        panic!("this test needs the host's KSM (root, /sys/kernel/mm/ksm writable): {e:#}")
    });
    let state = state_dir().join("disco-ksm.saved.json");
    let saved = ksm.settings().unwrap();
    let _restore = RestoreKsm(&ksm, saved.clone());
    {
        // What `disco bench sharing` does before its KSM phase, then a
        // SIGKILL: settings saved to the state file, KSM at full speed.
        let _lock = flock("disco-ksm.lock");
        assert!(
            !state.exists(),
            "{} exists before the test: a bench is running or left it",
            state.display()
        );
        std::fs::write(&state, serde_json::to_string_pretty(&saved).unwrap()).unwrap();
        ksm.apply(&KsmSetting::FASTEST).unwrap();
        ksm.write("run", "1").unwrap();
    }
    let err = any_disco_start();
    assert!(
        err.contains("left KSM at run=1 pages_to_scan=10000 sleep_millisecs=0; restored"),
        "{err}"
    );
    assert_eq!(
        saved.differences(&ksm.settings().unwrap()),
        Vec::<String>::new(),
        "KSM settings restored"
    );
    assert!(!state.exists(), "the state file is removed");
    // Nothing left: the next start says nothing about KSM.
    assert!(!any_disco_start().contains("KSM"));
}

#[test]
fn max_map_count_left_raised_by_a_killed_monitor_is_set_back_at_any_start() {
    let _serial = serial();
    let state = state_dir().join(MAP_COUNT_STATE);
    let before = map_count();
    let raised = before + 1000;
    {
        // A monitor raised the limit, then died by SIGKILL.
        let _lock = flock("disco-max-map-count.lock");
        assert!(
            !state.exists(),
            "{} exists before the test",
            state.display()
        );
        std::fs::write(
            &state,
            format!(
                r#"{{"original": {before}, "set_to": {raised},
                   "holders": [{{"pid": {}, "start": 1, "token": 1}}]}}"#,
                dead_pid()
            ),
        )
        .unwrap();
        std::fs::write(MAP_COUNT, raised.to_string()).unwrap();
    }
    let err = any_disco_start();
    if map_count() != before {
        let _ = std::fs::write(MAP_COUNT, before.to_string());
    }
    assert!(
        err.contains(&format!(
            "set vm.max_map_count back from {raised} to {before}"
        )),
        "{err}"
    );
    assert!(!state.exists(), "the state file is removed");
    assert_eq!(map_count(), before);
}

/// The `vm.max_map_count` state file, which no monitor may hold when a
/// test starts.
fn absent_map_count_state() -> PathBuf {
    let state = state_dir().join(MAP_COUNT_STATE);
    assert!(
        !state.exists(),
        "{} exists before the test",
        state.display()
    );
    state
}

/// The holders recorded in the state file.
fn holders(state: &Path) -> usize {
    let text = std::fs::read_to_string(state).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["holders"].as_array().unwrap().len()
}

#[test]
fn max_map_count_raised_for_guest_memory_is_set_back_when_the_last_monitor_ends() {
    let _serial = serial();
    let state = absent_map_count_state();
    let before = map_count();
    // A guest space of `before` pages needs more mappings than allowed:
    // the mapper budgets one per page. Pools are sparse, so this costs
    // address space, not memory.
    let frames = before;
    let capacity = u32::try_from(frames + 1024).expect("vm.max_map_count fits a pool");
    let big = Memory::new(&[(0, 0, capacity)]).unwrap();
    big.create_space("big", frames, 0).unwrap();
    let raised = map_count();
    assert!(raised > before, "raised from {before} to {raised}");
    assert_eq!(holders(&state), 1);

    // A second monitor that needs no raise but runs under this one's.
    let small = Memory::new(&[(0, 0, 1024)]).unwrap();
    small.create_space("small", 16, 0).unwrap();
    assert_eq!(holders(&state), 2);

    drop(big);
    assert_eq!(
        map_count(),
        raised,
        "kept while another monitor relies on it"
    );
    drop(small);
    assert_eq!(map_count(), before, "set back when the last monitor ends");
    assert!(!state.exists(), "the state file is removed");
}

/// Under a budget of kernel mappings the mapper raises `vm.max_map_count`
/// to what the budget allows (each VM's cap plus its reserve), not to one
/// mapping per guest page: a space of four times the limit in pages needs
/// no raise. Turning the budget off (0 frames per mapping, the old rule)
/// raises it for one mapping per page, and the value found comes back
/// when the memory goes.
#[test]
fn max_map_count_is_raised_for_the_mapping_budget_not_for_every_page() {
    let _serial = serial();
    let state = absent_map_count_state();
    let before = map_count();
    let frames = before * 4;
    let needed = disco::memory::mapper::map_count_needed([frames], 16);
    let per_page = disco::memory::mapper::map_count_needed([frames], 0);
    eprintln!(
        "{frames} frames: {needed} mappings needed under a budget of 1 per 16 frames, \
         {per_page} without; vm.max_map_count {before}"
    );
    assert!(
        needed < before && per_page > before,
        "{needed} / {per_page} / {before}"
    );
    let capacity = u32::try_from(frames + 1024).expect("the pool fits");
    let memory = Memory::new(&[(0, 0, capacity)]).unwrap();
    memory.set_frames_per_mapping(16).unwrap();
    memory.create_space("big", frames, 0).unwrap();
    assert_eq!(map_count(), before, "no raise needed under the budget");
    assert!(!state.exists(), "nothing raised, nothing recorded");

    memory.set_frames_per_mapping(0).unwrap();
    let raised = map_count();
    assert!(
        raised >= per_page,
        "raised from {before} to {raised} for one mapping a page"
    );
    assert_eq!(holders(&state), 1);
    drop(memory);
    assert_eq!(map_count(), before, "set back when the memory goes");
    assert!(!state.exists(), "the state file is removed");
}
