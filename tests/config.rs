//! Config validation: every mistake names the file, the key and what is
//! allowed. No KVM needed.

use std::path::{Path, PathBuf};

mod common;

use disco::config::Config;

/// Writes `text` to a file called `name` in a directory of its own: the
/// tests run side by side and some reuse names, and one makes FIFOs, so a
/// shared directory let a test write into another's FIFO and block forever.
fn write_temp(name: &str, text: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir()
        .join(format!("disco-config-test-{}", std::process::id()))
        .join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD_VM: &str = r#"
[host]
topology = "4-node"

[[vm]]
name = "a"
vcpus = 2
node = 1
memory_mib = 8
workload = { kind = "sweep", seed = 3, passes = 2 }
"#;

/// Loads `text` from a file called `name` and returns the error message,
/// checking that it starts with the file's path.
fn error_of(name: &str, text: &str) -> String {
    let path = write_temp(name, text);
    let err = Config::load(&path)
        .expect_err("config should be rejected")
        .to_string();
    assert!(
        err.starts_with(&path.display().to_string()),
        "error must name the file {}: {err}",
        path.display()
    );
    err
}

fn assert_contains(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected `{p}` in error: {err}");
    }
}

#[test]
fn a_good_config_parses() {
    let path = write_temp("good.toml", GOOD_VM);
    let c = Config::load(&path).unwrap();
    assert_eq!(c.vms.len(), 1);
    assert_eq!(c.vms[0].vcpu_nodes, vec![1, 1]);
    assert_eq!(c.vms[0].memory_node, 1);
    assert_eq!(
        c.policy.name, "disco",
        "the default policy is policies/disco.toml"
    );
}

#[test]
fn the_embedded_default_and_every_shipped_config_and_policy_parse() {
    let c = Config::embedded_default();
    assert!(c.vms.len() >= 4, "the demo runs several VMs");
    assert!(
        c.topology().unwrap().node_count() > 1,
        "the demo runs on a multi-node topology"
    );
    for dir in ["configs", "policies"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            if dir == "configs" {
                // Paths inside are relative to the config file; the files
                // they name are checked too (configs/linux.toml needs
                // scripts/fetch-linux-guest.sh, which scripts/test.sh runs).
                Config::load(&path).unwrap_or_else(|e| {
                    panic!(
                        "{} does not parse: {e} (for configs/linux.toml: run scripts/fetch-linux-guest.sh)",
                        path.display()
                    )
                });
                continue;
            }
            // A policy file is used from a config that names it.
            let text = format!(
                "policy = \"{}\"\n{GOOD_VM}",
                std::fs::canonicalize(&path).unwrap().display()
            );
            Config::parse(
                &text,
                &path.display().to_string(),
                std::path::Path::new("."),
            )
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        }
    }
}

#[test]
fn count_makes_numbered_vms() {
    let c = Config::parse(
        &GOOD_VM.replace("name = \"a\"", "name = \"a\"\ncount = 3"),
        "x.toml",
        std::path::Path::new("."),
    )
    .unwrap();
    let names: Vec<_> = c.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a-0", "a-1", "a-2"]);
}

#[test]
fn invalid_toml() {
    let err = error_of("syntax.toml", "[[vm]\nname = ");
    assert_contains(&err, &["not valid TOML"]);
}

#[test]
fn unknown_top_level_key() {
    let err = error_of("unknown.toml", &format!("vms = 3\n{GOOD_VM}"));
    assert_contains(&err, &["key `vms`", "unknown key", "allowed here:", "vm"]);
}

#[test]
fn unknown_vm_key_is_an_error_not_ignored() {
    let err = error_of("typo.toml", &GOOD_VM.replace("vcpus = 2", "vcpu = 2"));
    assert_contains(&err, &["key `vm[0].vcpu`", "unknown key", "vcpus"]);
}

#[test]
fn no_vms() {
    let err = error_of("novm.toml", "[host]\ntopology = \"host\"\n");
    assert_contains(&err, &["key `vm`", "at least one [[vm]]"]);
}

#[test]
fn zero_vcpus() {
    let err = error_of("vcpus.toml", &GOOD_VM.replace("vcpus = 2", "vcpus = 0"));
    assert_contains(
        &err,
        &["key `vm[0].vcpus`", "0 is out of range", "allowed: 1 to 64"],
    );
}

#[test]
fn node_outside_the_topology() {
    let err = error_of("node.toml", &GOOD_VM.replace("node = 1", "node = 7"));
    assert_contains(
        &err,
        &["key `vm[0].node`", "7 is out of range", "0 to 3", "4 nodes"],
    );
}

#[test]
fn vcpu_node_outside_the_topology() {
    let err = error_of(
        "vcpunodes.toml",
        &GOOD_VM.replace("vcpus = 2\nnode = 1", "vcpu_nodes = [0, 9]"),
    );
    assert_contains(&err, &["key `vm[0].vcpu_nodes[1]`", "9 is out of range"]);
}

#[test]
fn unknown_workload() {
    let err = error_of(
        "kind.toml",
        &GOOD_VM.replace("kind = \"sweep\"", "kind = \"mine\""),
    );
    assert_contains(
        &err,
        &[
            "key `vm[0].workload.kind`",
            "`mine` is not a workload",
            "fill",
            "table_scan",
        ],
    );
}

#[test]
fn parameter_of_another_workload() {
    let err = error_of(
        "param.toml",
        &GOOD_VM.replace("kind = \"sweep\"", "kind = \"fill\""),
    );
    assert_contains(
        &err,
        &[
            "key `vm[0].workload.passes`",
            "unknown key",
            "allowed here: kind, private_seed, seed, shared_percent",
        ],
    );
}

#[test]
fn a_write_after_beyond_the_lookups_is_an_error() {
    let err = error_of(
        "writer.toml",
        "[[vm]]\nname = \"w\"\nworkload = { kind = \"table_scan\", lookups = 10, write_after = 11 }\n",
    );
    assert_contains(
        &err,
        &[
            "writer.toml",
            "key `vm[0].workload.write_after`",
            "11 is out of range; allowed: 0 (never write) to `lookups` (10)",
        ],
    );
}

#[test]
fn memory_too_small_for_the_workload() {
    let err = error_of(
        "small.toml",
        &GOOD_VM.replace(
            "kind = \"sweep\", seed = 3, passes = 2",
            "kind = \"table_scan\", table_pages = 4096",
        ),
    );
    assert_contains(&err, &["key `vm[0].memory_mib`", "too small", "at least"]);
}

#[test]
fn duplicate_vm_names() {
    let err = error_of("dup.toml", &format!("{GOOD_VM}\n[[vm]]\nname = \"a\"\n"));
    assert_contains(&err, &["key `vm[1].name`", "used twice"]);
}

#[test]
fn node_and_vcpu_nodes_together() {
    let err = error_of(
        "both.toml",
        &GOOD_VM.replace("node = 1", "node = 1\nvcpu_nodes = [0, 1]"),
    );
    assert_contains(
        &err,
        &["key `vm[0].vcpu_nodes`", "either `node`", "not both"],
    );
}

#[test]
fn vcpus_disagree_with_vcpu_nodes() {
    let err = error_of(
        "disagree.toml",
        &GOOD_VM.replace("vcpus = 2\nnode = 1", "vcpus = 3\nvcpu_nodes = [0, 1]"),
    );
    assert_contains(&err, &["key `vm[0].vcpus`", "must agree"]);
}

#[test]
fn wrong_type() {
    let err = error_of(
        "type.toml",
        &GOOD_VM.replace("vcpus = 2", "vcpus = \"two\""),
    );
    assert_contains(
        &err,
        &["key `vm[0].vcpus`", "expected an integer", "found a string"],
    );
}

#[test]
fn unknown_topology() {
    let err = error_of("topo.toml", &GOOD_VM.replace("\"4-node\"", "\"moon\""));
    assert_contains(
        &err,
        &["key `host.topology`", "`moon` is not a topology", "4-node"],
    );
}

#[test]
fn missing_topology_file() {
    let err = error_of(
        "topofile.toml",
        &GOOD_VM.replace("\"4-node\"", "\"nowhere.xml\""),
    );
    assert_contains(
        &err,
        &["key `host.topology`", "cannot load it", "nowhere.xml"],
    );
}

#[test]
fn bad_policy_value() {
    let err = error_of(
        "policy.toml",
        &format!("[policy]\nname = \"p\"\n[policy.sharing]\nenabled = \"yes\"\n{GOOD_VM}"),
    );
    assert_contains(
        &err,
        &["key `policy.sharing.enabled`", "expected true or false"],
    );
}

#[test]
fn unknown_policy_name() {
    let err = error_of(
        "policyname.toml",
        &format!("policy = \"fastest\"\n{GOOD_VM}"),
    );
    assert_contains(
        &err,
        &[
            "key `policy`",
            "`fastest` is not a policy",
            "disco",
            "static",
        ],
    );
}

#[test]
fn bad_value_inside_a_policy_file_names_that_file() {
    let policy = write_temp("badpolicy.toml", "[numa]\nepoch_ms = 0\n");
    let path = write_temp(
        "usespolicy.toml",
        &format!("policy = \"{}\"\n{GOOD_VM}", policy.display()),
    );
    let err = Config::load(&path).unwrap_err().to_string();
    assert_contains(
        &err,
        &[
            &policy.display().to_string(),
            "key `numa.epoch_ms`",
            "0 is out of range",
            "1 to 60000",
        ],
    );
}

#[test]
fn bad_vm_name() {
    let err = error_of(
        "name.toml",
        &GOOD_VM.replace("name = \"a\"", "name = \"my vm\""),
    );
    assert_contains(&err, &["key `vm[0].name`", "not a valid VM name"]);
}

#[test]
fn time_limit_out_of_range() {
    let err = error_of(
        "time.toml",
        &GOOD_VM.replace("memory_mib = 8", "memory_mib = 8\ntime_limit_s = 0"),
    );
    assert_contains(
        &err,
        &["key `vm[0].time_limit_s`", "out of range", "allowed"],
    );
}

#[test]
fn missing_file() {
    let err = Config::load(std::path::Path::new("/nonexistent/disco.toml"))
        .unwrap_err()
        .to_string();
    assert_contains(
        &err,
        &[
            "/nonexistent/disco.toml",
            "cannot be opened",
            "No such file",
        ],
    );
}

#[test]
fn bad_sample_run_lengths_name_the_key_and_the_range() {
    for (value, found) in [("0", "0 is out of range"), ("513", "513 is out of range")] {
        let err = error_of(
            "runs.toml",
            &format!(
                "[policy]\nname = \"p\"\n[policy.numa]\nsample_run_pages = {value}\n{GOOD_VM}"
            ),
        );
        assert_contains(
            &err,
            &[
                "runs.toml",
                "key `policy.numa.sample_run_pages`",
                found,
                "allowed: 1 to 512",
            ],
        );
    }
    let err = error_of(
        "runs.toml",
        &format!("[policy]\nname = \"p\"\n[policy.numa]\nsample_run_pages = 2.5\n{GOOD_VM}"),
    );
    assert_contains(&err, &["key `policy.numa.sample_run_pages`"]);
}

#[test]
fn bad_sampling_cost_cap_values_name_the_key_and_the_range() {
    for (value, found) in [
        ("0", "0 is out of range"),
        ("1.5", "1.5 is out of range"),
        ("-0.02", "-0.02 is out of range"),
        ("nan", "NaN is out of range"),
    ] {
        let err = error_of(
            "cap.toml",
            &format!(
                "[policy]\nname = \"p\"\n[policy.numa]\nmax_sampling_overhead = {value}\n{GOOD_VM}"
            ),
        );
        assert_contains(
            &err,
            &[
                "cap.toml",
                "key `policy.numa.max_sampling_overhead`",
                found,
                "allowed: 0.0001 to 1",
            ],
        );
    }
    let err = error_of(
        "cap.toml",
        &format!(
            "[policy]\nname = \"p\"\n[policy.numa]\nmax_sampling_overhead = \"2%\"\n{GOOD_VM}"
        ),
    );
    assert_contains(
        &err,
        &["key `policy.numa.max_sampling_overhead`", "a number"],
    );
    let err = error_of(
        "cost.toml",
        &format!("[policy]\nname = \"p\"\n[policy.numa]\nsample_fault_cost_us = 0\n{GOOD_VM}"),
    );
    assert_contains(
        &err,
        &[
            "key `policy.numa.sample_fault_cost_us`",
            "allowed: 0.1 to 100000",
        ],
    );
}

/// A config of one good VM under an inline policy with `numa` as its
/// `[policy.numa]` section.
fn with_numa(numa: &str) -> Result<Config, disco::config::ConfigError> {
    Config::parse(
        &format!("[policy]\nname = \"p\"\n[policy.numa]\n{numa}\n{GOOD_VM}"),
        "<t>",
        Path::new("."),
    )
}

#[test]
fn follow_vm_is_a_switch_on_by_default() {
    assert!(with_numa("").unwrap().policy.numa.follow_vm);
    assert!(
        !with_numa("follow_vm = false")
            .unwrap()
            .policy
            .numa
            .follow_vm
    );
    let err = error_of(
        "follow.toml",
        &format!("[policy]\nname = \"p\"\n[policy.numa]\nfollow_vm = \"yes\"\n{GOOD_VM}"),
    );
    assert_contains(&err, &["follow.toml", "key `policy.numa.follow_vm`"]);
}

#[test]
fn the_settled_sampling_allowance_is_checked_against_the_cap() {
    let parse = |numa: &str| {
        with_numa(numa).map(|c| {
            let n = &c.policy.numa;
            (n.max_sampling_overhead, n.settled_sampling_overhead)
        })
    };
    assert_eq!(parse("").unwrap(), (0.02, 0.004), "the defaults");
    assert_eq!(
        parse("max_sampling_overhead = 0.001").unwrap(),
        (0.001, 0.001),
        "a cap below the default floor lowers the floor with it"
    );
    assert_eq!(
        parse("settled_sampling_overhead = 0.02").unwrap(),
        (0.02, 0.02),
        "equal to the cap: no back-off"
    );
    for (value, found) in [("0", "0 is out of range"), ("2", "2 is out of range")] {
        let err = error_of(
            "settled.toml",
            &format!(
                "[policy]\nname = \"p\"\n[policy.numa]\nsettled_sampling_overhead = {value}\n{GOOD_VM}"
            ),
        );
        assert_contains(
            &err,
            &[
                "settled.toml",
                "key `policy.numa.settled_sampling_overhead`",
                found,
                "allowed: 0.0001 to 1",
            ],
        );
    }
    let err = error_of(
        "settled.toml",
        &format!(
            "[policy]\nname = \"p\"\n[policy.numa]\nmax_sampling_overhead = 0.01\nsettled_sampling_overhead = 0.05\n{GOOD_VM}"
        ),
    );
    assert_contains(
        &err,
        &[
            "settled.toml",
            "key `policy.numa.settled_sampling_overhead`",
            "0.05 is above max_sampling_overhead (0.01)",
            "allowed: 0.0001 to max_sampling_overhead",
        ],
    );
}

#[test]
fn config_and_policy_files_that_would_hang_or_exhaust_are_refused() {
    let fifo = write_temp("fifo-placeholder", "").with_file_name("config.fifo");
    common::mkfifo(&fifo);
    let big = write_temp("big.toml", "");
    // Sparse: past the cap without writing it (the issue's 50 MB config
    // took 7.8 s and 3.76 GB before its error).
    std::fs::File::create(&big)
        .unwrap()
        .set_len(50 << 20)
        .unwrap();
    for (path, expect) in [
        (
            fifo.clone(),
            "config file is a FIFO (named pipe); allowed: a regular file",
        ),
        (
            PathBuf::from("/dev/zero"),
            "config file is a character device; allowed: a regular file",
        ),
        (
            big.clone(),
            "config file is 50.0 MiB (52428800 bytes); allowed: at most 1.0 MiB (1048576 bytes)",
        ),
    ] {
        let p = path.clone();
        let err = common::within(&format!("loading {}", path.display()), move || {
            Config::load(&p).unwrap_err().to_string()
        });
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert_contains(&err, &[expect]);
    }
    // A policy file is read the same way.
    let policy_fifo = fifo.with_file_name("policy.toml");
    common::mkfifo(&policy_fifo);
    let config = format!("policy = \"{}\"\n{GOOD_VM}", policy_fifo.display());
    let err = common::within("loading a config naming a FIFO policy", move || {
        error_of("fifo-policy.toml", &config)
    });
    assert_contains(
        &err,
        &[
            "key `policy`",
            &format!("policy file {} is a FIFO", policy_fifo.display()),
            "allowed: a regular file",
        ],
    );
}

#[test]
fn sharing_domains_that_no_vm_has_are_an_error() {
    let vms = "[[vm]]\nname = \"a\"\nsharing_domain = \"red\"\n[[vm]]\nname = \"b\"\n";
    let err = error_of(
        "domains.toml",
        &format!("[policy.sharing]\ndomains = [\"red\", \"nosuch\"]\n{vms}"),
    );
    assert_contains(
        &err,
        &[
            "key `policy.sharing.domains`",
            "`nosuch`, which is no VM's sharing_domain",
            "allowed: the sharing domains of this config's VMs (default, red)",
        ],
    );
    // In a policy file: the config names it, the message names the file.
    let policy = write_temp("domains-policy.toml", "[sharing]\ndomains = [\"blue\"]\n");
    let err = error_of(
        "domains-file.toml",
        &format!("policy = \"{}\"\n{vms}", policy.display()),
    );
    assert_contains(
        &err,
        &[
            "key `policy`",
            &policy.display().to_string(),
            "`blue`, which is no VM's sharing_domain",
        ],
    );
    // Domains that exist are fine.
    let ok = write_temp(
        "domains-ok.toml",
        &format!("[policy.sharing]\ndomains = [\"red\"]\n{vms}"),
    );
    assert_eq!(
        Config::load(&ok).unwrap().policy.sharing.domains,
        vec!["red".to_string()]
    );
}

#[test]
fn a_vm_without_workload_gets_the_documented_default_and_says_so() {
    let c = Config::load(&write_temp(
        "default-workload.toml",
        "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nworkload = { kind = \"fill\", seed = 1 }\n",
    ))
    .unwrap();
    assert!(c.vms[0].workload_is_default);
    assert!(!c.vms[1].workload_is_default);
    // The default is exactly what DEFAULT_WORKLOAD spells.
    assert_eq!(c.vms[0].workload, c.vms[1].workload);
    assert_eq!(
        disco::config::DEFAULT_WORKLOAD,
        "{ kind = \"fill\", seed = 1 }"
    );
}

#[test]
fn a_micro_vm_above_the_layout_maximum_is_rejected_by_check() {
    let err = error_of(
        "big-vm.toml",
        &GOOD_VM.replace("memory_mib = 8", "memory_mib = 4097"),
    );
    assert_contains(
        &err,
        &[
            "key `vm[0].memory_mib`",
            "4097 is out of range; allowed: 2 to 4096",
        ],
    );
}

/// Host memory in MiB, as the monitor sees it.
fn host_mib() -> u64 {
    (disco::memory::mapper::host_pages() * 4096) >> 20
}

#[test]
fn vms_that_overflow_a_node_pool_are_rejected_by_check() {
    // The 4-node fixture's nodes have 32 GiB each; 1024 VMs of 4 GiB on
    // node 0 is more than any pool (issue: 1024 VMs passed check and run
    // then spent 120 s building pmaps).
    let err = error_of(
        "pool.toml",
        &GOOD_VM.replace("memory_mib = 8", "memory_mib = 4096\ncount = 1024"),
    );
    assert_contains(
        &err,
        &[
            "key `vm`",
            "the VMs whose memory starts on node 1 (a-0, a-1, a-2, ... (1024 VMs)) need 4194304 MiB",
            "more than node 1's pool",
            "allowed: at most",
        ],
    );
}

#[test]
fn vms_that_need_more_than_the_host_are_rejected_by_check() {
    // Nodes of 2^50 bytes: each pool is capped at the host's memory, so
    // only the total over the two nodes can exceed it.
    let xml = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topology-fixtures/2-socket.xml"),
    )
    .unwrap();
    let mut big = String::new();
    for part in xml.split("local_memory=\"").enumerate().map(|(i, p)| {
        if i == 0 {
            p.to_string()
        } else {
            let end = p.find('"').unwrap();
            format!("local_memory=\"{}{}", 1u64 << 50, &p[end..])
        }
    }) {
        big.push_str(&part);
    }
    let topo = write_temp("huge-nodes.xml", &big);
    // 60 % of the host on each node: each fits its pool, both do not fit the host.
    let per_node = (host_mib() * 6 / 10).div_ceil(4096);
    let text = format!(
        "[host]\ntopology = \"{}\"\n[[vm]]\nname = \"a\"\nmemory_mib = 4096\ncount = {per_node}\nnode = 0\n\
         [[vm]]\nname = \"b\"\nmemory_mib = 4096\ncount = {per_node}\nnode = 1\n",
        topo.display()
    );
    let err = error_of("host.toml", &text);
    assert_contains(
        &err,
        &[
            "key `vm`",
            &format!(
                "the {} VMs have {} MiB of guest RAM in all, more than the host's",
                2 * per_node,
                2 * per_node * 4096
            ),
            "allowed: at most",
        ],
    );
}

#[test]
fn run_refuses_what_check_refuses_before_changing_anything() {
    // A config built in code (past `Config::parse`'s checks): `run` checks
    // it again before it opens KVM or raises vm.max_map_count.
    let mut c = Config::load(&write_temp("run.toml", GOOD_VM)).unwrap();
    let vm = c.vms[0].clone();
    c.vms = (0..host_mib() / 4096 + 1)
        .map(|i| {
            let mut v = vm.clone();
            v.name = format!("a{i}");
            v.memory_mib = 4096;
            v
        })
        .collect();
    let map_count = || -> u64 {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = map_count();
    let err = disco::monitor::run(&c, &disco::monitor::RunOptions::default())
        .expect_err("run must refuse it")
        .to_string();
    assert_contains(&err, &["key `vm`", "more than"]);
    // Raising it for these VMs would take it to at least `needed` (another
    // test process on the machine may change it meanwhile, not that far).
    let needed = disco::memory::mapper::map_count_needed(
        c.vms.iter().map(|v| v.memory_mib * 256),
        c.policy.sharing.frames_per_mapping,
    );
    let after = map_count();
    assert!(
        after == before || after < needed,
        "vm.max_map_count went from {before} to {after} (the VMs would need {needed})"
    );
}

#[test]
fn bad_mapping_budget_values_name_the_key_and_the_range() {
    for (value, found) in [
        ("-1", "-1"),
        ("2000000", "2000000 is out of range"),
        ("\"16\"", "a"),
    ] {
        let err = error_of(
            "budget.toml",
            &format!(
                "[policy]\nname = \"p\"\n[policy.sharing]\nframes_per_mapping = {value}\n{GOOD_VM}"
            ),
        );
        assert_contains(
            &err,
            &[
                "budget.toml",
                "key `policy.sharing.frames_per_mapping`",
                found,
            ],
        );
    }
    let err = error_of(
        "budget.toml",
        &format!(
            "[policy]\nname = \"p\"\n[policy.sharing]\nframes_per_mapping = 2000000\n{GOOD_VM}"
        ),
    );
    assert_contains(&err, &["allowed: 0 to 1048576"]);
}

#[test]
fn a_shared_run_that_is_not_a_power_of_two_is_refused() {
    for (value, found) in [("3", "3 is not a power of two"), ("0", "0 is out of range")] {
        let err = error_of(
            "run.toml",
            &GOOD_VM
                .replace(
                    "kind = \"sweep\"",
                    &format!("kind = \"fill\", shared_percent = 50, shared_run = {value}"),
                )
                .replace(", passes = 2", ""),
        );
        assert_contains(
            &err,
            &["run.toml", "key `vm[0].workload.shared_run`", found],
        );
    }
}

#[test]
fn a_busy_cpu_share_out_of_range_is_refused() {
    for value in ["0", "1.5", "-0.1", "\"a lot\""] {
        let err = error_of(
            "share.toml",
            &format!(
                "[policy]\nname = \"p\"\n[policy.sharing]\nbusy_cpu_share = {value}\n{GOOD_VM}"
            ),
        );
        assert_contains(&err, &["share.toml", "key `policy.sharing.busy_cpu_share`"]);
    }
    let err = error_of(
        "share.toml",
        &format!("[policy]\nname = \"p\"\n[policy.sharing]\nbusy_cpu_share = 2\n{GOOD_VM}"),
    );
    assert_contains(&err, &["allowed: 0.0001 to 1"]);
}

#[test]
fn large_folios_is_true_by_default_and_must_be_a_bool() {
    let path = write_temp("folios-default.toml", GOOD_VM);
    assert!(Config::load(&path).unwrap().large_folios);
    let off = write_temp(
        "folios-off.toml",
        &GOOD_VM.replace("[host]\n", "[host]\nlarge_folios = false\n"),
    );
    assert!(!Config::load(&off).unwrap().large_folios);
    let err = error_of(
        "folios-bad.toml",
        &GOOD_VM.replace("[host]\n", "[host]\nlarge_folios = 64\n"),
    );
    assert_contains(&err, &["key `host.large_folios`", "expected true or false"]);
}
