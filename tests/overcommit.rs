//! Overcommit (`[host] overcommit`, `[host] memory_limit_mib`): VMs whose
//! memory does not fit the pools wait and start in waves as sharing gives
//! memory back; a VM that can never fit is reported, not left waiting.
//! Real micro-VMs, real merges.

mod common;

use disco::kvm_check::require_kvm;

/// A sharing-only policy (no page sampling): what is tested is admission.
const POLICY: &str = r#"
[policy.sharing]
enabled = true
pages_per_second = 100000

[policy.numa]
migrate = false
replicate = false
"#;

/// `n` 16 MiB `fill` VMs, 90 % of whose data pages are identical across
/// them (blocks of 16 frames), each with its own private content.
fn fill_vms(n: usize, shared_percent: u8) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[vm]]\nname = \"wave{i}\"\nmemory_mib = 16\nvcpus = 1\n\
                 workload = {{ kind = \"fill\", seed = 7, private_seed = {}, shared_percent = {shared_percent}, shared_run = 16 }}\n",
                100 + i
            )
        })
        .collect()
}

#[test]
fn overcommitted_vms_start_in_waves_as_sharing_frees_memory() {
    if !require_kvm("overcommitted_vms_start_in_waves_as_sharing_frees_memory") {
        return;
    }
    // 4 x 16 MiB of guests in pools of 40 MiB: two fit at first, the others
    // only once the scanner has merged what the first ones share.
    let text = format!(
        "[host]\novercommit = true\nmemory_limit_mib = 40\n{POLICY}\n{}",
        fill_vms(4, 90)
    );
    let report = common::run_config(&text);
    for vm in &report.vms {
        assert_eq!(vm.status, "ok", "{}: {:?}", vm.name, vm.error);
    }
    let waited: Vec<&str> = report
        .vms
        .iter()
        .filter(|v| v.waited_ms > 0.0)
        .map(|v| v.name.as_str())
        .collect();
    assert!(
        waited.len() >= 2,
        "at most two 16 MiB VMs fit 40 MiB at once, so the others waited: {waited:?}"
    );
    assert!(
        report.verify_errors.is_empty(),
        "verify: {:?}",
        report.verify_errors
    );
    // Host memory the pools held never exceeded the limit.
    let peak = report
        .memory_timeline
        .iter()
        .map(|s| s.pool_resident_bytes)
        .max()
        .unwrap_or(0);
    assert!(peak <= 40 << 20, "pools held {peak} bytes, limit 40 MiB");
    assert!(report
        .sharing
        .as_ref()
        .is_some_and(|s| s.scanner.merges > 0));
}

#[test]
fn a_vm_that_can_never_fit_is_reported_not_started() {
    if !require_kvm("a_vm_that_can_never_fit_is_reported_not_started") {
        return;
    }
    // Two VMs of 24 MiB with nothing in common in 40 MiB: each fits alone,
    // the second never fits next to the first.
    let text = format!(
        "[host]\novercommit = true\nmemory_limit_mib = 40\n{POLICY}\n{}",
        fill_vms(2, 0).replace("memory_mib = 16", "memory_mib = 24")
    );
    let report = common::run_config(&text);
    assert_eq!(report.vms[0].status, "ok", "{:?}", report.vms[0].error);
    let second = &report.vms[1];
    assert_eq!(second.status, "failed");
    let why = second.error.as_deref().unwrap_or("");
    assert!(why.contains("never fit the pools"), "{why}");
    assert!(why.contains("memory_limit_mib"), "{why}");
}

#[test]
fn overcommit_limits_are_checked_before_anything_starts() {
    let host_mib = (disco::memory::mapper::host_pages() * disco::PAGE_SIZE as u64) >> 20;
    let too_much = format!(
        "[host]\nmemory_limit_mib = {}\n{POLICY}\n{}",
        host_mib + 1024,
        fill_vms(1, 90)
    );
    let e = disco::config::Config::parse(&too_much, "big.toml", std::path::Path::new("."))
        .expect_err("a limit above the host's memory is refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("big.toml") && msg.contains("host.memory_limit_mib"),
        "{msg}"
    );
    assert!(msg.contains("more than the host's memory"), "{msg}");

    let one_too_big = format!(
        "[host]\novercommit = true\nmemory_limit_mib = 32\n{POLICY}\n{}",
        fill_vms(1, 90).replace("memory_mib = 16", "memory_mib = 32")
    );
    let e = disco::config::Config::parse(&one_too_big, "one.toml", std::path::Path::new("."))
        .expect_err("a VM that can never fit alone is refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("one.toml") && msg.contains("wave0"), "{msg}");
    assert!(msg.contains("can ever give it under overcommit"), "{msg}");

    let not_overcommitted = format!(
        "[host]\nmemory_limit_mib = 40\n{POLICY}\n{}",
        fill_vms(4, 90)
    );
    let e =
        disco::config::Config::parse(&not_overcommitted, "four.toml", std::path::Path::new("."))
            .expect_err("without overcommit, the VMs must fit together");
    let msg = format!("{e:#}");
    assert!(msg.contains("four.toml") && msg.contains("pool"), "{msg}");
    assert!(
        msg.contains("overcommit = true"),
        "the way out is named: {msg}"
    );
}
