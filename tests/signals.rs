//! SIGINT and SIGTERM during `disco run`: the built binary runs a guest
//! that never finishes on its own; a signal stops the guests, the report
//! (text or JSON) says the run was interrupted, the control socket goes and
//! `vm.max_map_count` is set back; a second signal exits at once.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{DiscoRun, SPIN_CONFIG};
use disco::kvm_check::require_kvm;

/// One run at a time: a run that raised `vm.max_map_count` sets it back
/// only when no other monitor relies on it, so the runs of parallel tests
/// would keep each other's raise alive.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn sigint_stops_the_guests_prints_the_report_and_removes_the_socket() {
    if !require_kvm("sigint_stops_the_guests_prints_the_report_and_removes_the_socket") {
        return;
    }
    let _serial = serial();
    let mut run = DiscoRun::start("sigint-text", SPIN_CONFIG, &[]);
    run.wait_status(&["spinner running", "quick finished"]);
    run.signal(libc::SIGINT);
    let code = run.wait_exit();
    let (out, err) = (run.stdout(), run.stderr());
    assert_eq!(code, 128 + libc::SIGINT, "exit status\n{out}\n{err}");
    assert!(
        out.contains(
            "INTERRUPTED by SIGINT: the run was ended early (guests still running were stopped)"
        ),
        "{out}"
    );
    let spinner = out.lines().find(|l| l.starts_with("spinner")).unwrap();
    assert!(
        spinner.contains("interrupted: stopped before it finished: SIGINT interrupted the run"),
        "{spinner}"
    );
    let quick = out.lines().find(|l| l.starts_with("quick")).unwrap();
    assert!(quick.contains("ok, checksums verified"), "{quick}");
    assert!(out.contains("memory invariants checked"), "{out}");
    assert!(err.contains("SIGINT: stopping the guests"), "{err}");
    assert!(!run.socket.exists(), "the control socket is removed");
}

/// 4 GiB VMs, enough of them that the run must raise `vm.max_map_count`
/// (the mapper reserves each VM's bound of kernel mappings, derived from
/// the default budget: `memory::budget::mapping_bound`), the first
/// spinning.
fn config_raising_map_count(current: u64) -> String {
    const FRAMES_PER_VM: u64 = 4096 * 256;
    let per_vm =
        disco::memory::budget::mapping_bound(FRAMES_PER_VM, disco::sharing::FRAMES_PER_MAPPING);
    let vms = (current + 8192) / per_vm + 1;
    let mut config = String::from("policy = \"static\"\n[host]\ntopology = \"host\"\n");
    for i in 0..vms {
        let workload = if i == 0 {
            "{ kind = \"spin\" }\ntime_limit_s = 120"
        } else {
            "{ kind = \"counters\", counters = 2, increments = 1000 }"
        };
        config += &format!("[[vm]]\nname = \"big{i}\"\nmemory_mib = 4096\nworkload = {workload}\n");
    }
    config
}

fn vms_in(config: &str) -> usize {
    config.matches("[[vm]]").count()
}

#[test]
fn sigterm_with_json_reports_interrupted_and_sets_max_map_count_back() {
    if !require_kvm("sigterm_with_json_reports_interrupted_and_sets_max_map_count_back") {
        return;
    }
    let _serial = serial();
    let before = map_count();
    let config = config_raising_map_count(before);
    let mut run = DiscoRun::start("sigterm-json", &config, &["--json"]);
    // big0 spins; every other VM finishes.
    let others: Vec<String> = (1..vms_in(&config))
        .map(|i| format!("big{i} finished"))
        .collect();
    let mut parts = vec!["big0 running"];
    parts.extend(others.iter().map(String::as_str));
    run.wait_status(&parts);
    let raised = map_count();
    assert!(
        raised > before,
        "the run should have raised vm.max_map_count from {before}: {}",
        run.stderr()
    );
    run.signal(libc::SIGTERM);
    let code = run.wait_exit();
    let (out, err) = (run.stdout(), run.stderr());
    assert_eq!(code, 128 + libc::SIGTERM, "exit status\n{err}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON report: {e}\n{out}\n{err}"));
    assert_eq!(report["interrupted"], "SIGTERM", "{out}");
    assert_eq!(report["vms"][0]["status"], "interrupted", "{out}");
    assert_eq!(report["vms"][1]["status"], "ok", "{out}");
    assert!(!run.socket.exists(), "the control socket is removed");
    assert_eq!(
        map_count(),
        before,
        "vm.max_map_count is set back (it was raised to {raised}): {err}"
    );
    assert!(
        err.contains(&format!(
            "set vm.max_map_count back from {raised} to {before}"
        )),
        "{err}"
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    if !require_kvm("a_second_signal_exits_at_once") {
        return;
    }
    let _serial = serial();
    let mut run = DiscoRun::start("second-signal", SPIN_CONFIG, &[]);
    run.wait_running("spinner");
    // Two different signals, so the kernel does not merge them into one.
    run.signal(libc::SIGINT);
    run.signal(libc::SIGTERM);
    let code = run.wait_exit();
    let err = run.stderr();
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(err.contains("SIGTERM again: exiting at once"), "{err}");
    assert!(!run.socket.exists(), "the control socket is removed");
}
