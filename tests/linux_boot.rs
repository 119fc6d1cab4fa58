//! Booting the Debian kernel (fetched by scripts/fetch-linux-guest.sh,
//! which scripts/test.sh runs before `cargo test`) on real KVM, with its RAM
//! in the monitor's pools.
//!
//! * `debian_kernel_reports_banner_e820_and_srat_nodes` runs everywhere KVM
//!   does, including the build hosts whose nested KVM emulates guest kernel
//!   mode (~1.5 M instructions/s, FACTS.md): a 2-node, 2-vCPU, 256 MiB VM
//!   boots the ELF vmlinux until its serial console has shown the "Linux
//!   version" banner, the e820 map the monitor built (every entry, exact
//!   addresses and types) and the NUMA nodes it read from the SRAT (each
//!   vCPU's APIC -> node and each node's memory range), then the test stops
//!   it. Time limit: 600 s (measured on the build host: about 60 s).
//! * `two_identical_linux_vms_under_the_disco_policy_boot_and_share` runs
//!   two identical 1-vCPU, 256 MiB Linux VMs through the whole monitor under
//!   `policies/disco.toml` (sharing, copy-on-write, sampling): both must
//!   print the banner and the e820 map, and share their kernel images.
//! * `full_boot_to_init_with_disk_read` boots to the initramfs's /init,
//!   which prints a marker and the first sector of the virtio disk, then
//!   resets; it needs hardware virtualisation (vmx/svm in /proc/cpuinfo)
//!   and is skipped loudly without it.

use std::time::{Duration, Instant};

use disco::config::Config;
use disco::linux::layout::{e820_map, E820_RAM};
use disco::memory::Memory;

mod common;
use common::linux_guest_dir as guest_dir;

fn config(text: &str) -> Config {
    Config::parse(text, "<linux test>", std::path::Path::new("/")).expect("valid config")
}

/// Boots VM 0 of `config` and polls its console until `done(text)` holds,
/// the VM ends, or `limit` passes; returns the console text, whether the
/// VM ended by itself, and its outcome.
fn boot_until(
    config: &Config,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> (String, bool, disco::vm::VmOutcome) {
    let topology = config.topology().unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let memory = Memory::for_topology(&topology).unwrap();
    let (space, mut vm) = disco::linux::build(&kvm, &memory, &topology, &config.vms[0])
        .expect("building the Linux VM");
    memory.verify().expect("memory invariants before boot");
    let stats = memory.space_stats(space).unwrap();
    for (i, node) in vm.numa().nodes.iter().enumerate() {
        assert_eq!(
            stats.pages_per_node[node.topology_node],
            node.mem_len / 4096,
            "guest node {i}'s RAM must be in topology node {}'s pool",
            node.topology_node
        );
    }
    let start = Instant::now();
    vm.start().unwrap();
    let mut ended_by_itself = false;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if vm.is_finished() {
            ended_by_itself = true;
            break;
        }
        if done(&vm.console_text()) || start.elapsed() > limit {
            break;
        }
    }
    eprintln!("stopping after {:.1} s", start.elapsed().as_secs_f64());
    vm.stop();
    let text = vm.console_text();
    let outcome = vm.wait();
    memory.verify().expect("memory invariants after the run");
    memory.destroy_space(space).unwrap();
    (text, ended_by_itself, outcome)
}

fn e820_lines(ram: u64) -> Vec<String> {
    e820_map(ram)
        .iter()
        .map(|e| {
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] {}",
                e.addr,
                e.addr + e.size - 1,
                if e.kind == E820_RAM {
                    "usable"
                } else {
                    "reserved"
                }
            )
        })
        .collect()
}

#[test]
fn debian_kernel_reports_banner_e820_and_srat_nodes() {
    if !disco::kvm_check::require_kvm("debian_kernel_reports_banner_e820_and_srat_nodes") {
        return;
    }
    let dir = guest_dir();
    let ram: u64 = 256 << 20;
    let c = config(&format!(
        r#"
[host]
topology = "2-socket"
[[vm]]
name = "linux-numa"
vcpu_nodes = [0, 1]
memory_mib = {}
kernel = "{}"
serial = "none"
time_limit_s = 600
"#,
        ram >> 20,
        dir.join("vmlinux").display()
    ));
    let half = ram / 2;
    let mut want: Vec<String> = vec!["Linux version".into()];
    want.extend(e820_lines(ram));
    want.push("SRAT: PXM 0 -> APIC 0x00 -> Node 0".into());
    want.push("SRAT: PXM 1 -> APIC 0x01 -> Node 1".into());
    want.push(format!(
        "ACPI: SRAT: Node 0 PXM 0 [mem {:#010x}-{:#010x}]",
        0,
        half - 1
    ));
    want.push(format!(
        "ACPI: SRAT: Node 1 PXM 1 [mem {:#010x}-{:#010x}]",
        half,
        ram - 1
    ));
    let (text, ended, outcome) = boot_until(&c, Duration::from_secs(600), |t| {
        want.iter().all(|w| t.contains(w.as_str()))
    });
    eprintln!("---- guest console ----\n{text}\n---- end ----");
    let missing: Vec<&String> = want.iter().filter(|w| !text.contains(w.as_str())).collect();
    assert!(
        missing.is_empty(),
        "lines missing from the console: {missing:?} (VM ended by itself: {ended}; outcome: {:?})",
        outcome.vcpus
    );
}

/// Whether the CPU offers hardware virtualisation (VT-x or AMD-V) to this
/// host: the `vmx` or `svm` flag in /proc/cpuinfo. (The build hosts' nested
/// `kvm_pvm` works without it, by emulating guest kernel mode.)
fn hardware_virtualisation() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn full_boot_to_init_with_disk_read() {
    if !disco::kvm_check::require_kvm("full_boot_to_init_with_disk_read") {
        return;
    }
    if !hardware_virtualisation() {
        eprintln!(
            "\n########################################################################\n\
             SKIP full_boot_to_init_with_disk_read: this host has no hardware\n\
             virtualisation (no vmx/svm flag in /proc/cpuinfo). Its KVM emulates guest\n\
             kernel mode at ~1.5 M instructions/s (FACTS.md), far too slow to boot\n\
             Linux to user space. Run this test on a VT-x/AMD-V host.\n\
             ########################################################################\n"
        );
        return;
    }
    let dir = guest_dir();
    let c = config(&format!(
        r#"
[host]
topology = "2-socket"
[[vm]]
name = "linux-full"
vcpu_nodes = [0, 1]
memory_mib = 256
kernel = "{}"
initramfs = "{}"
disk = [{{ path = "{}", read_only = true }}]
virtio_console = true
serial = "none"
time_limit_s = 120
"#,
        dir.join("bzImage").display(),
        dir.join("initramfs.cpio.gz").display(),
        dir.join("disk.img").display()
    ));
    // Runs until /init resets the VM (or the limit).
    let (text, ended, outcome) = boot_until(&c, Duration::from_secs(120), |_| false);
    eprintln!("---- guest console ----\n{text}\n---- end ----");
    for want in [
        "DISCO-INIT-OK",
        "cpus=2",
        "DISCO-DISK: disco test disk: sector 0 says hello",
        "DISCO-HVC: /dev/hvc0",
        "DISCO-INIT-DONE",
    ] {
        assert!(text.contains(want), "`{want}` missing from the console");
    }
    assert!(ended, "the guest did not reset the VM after /init finished");
    assert!(
        outcome.vcpus.iter().all(|v| v.checksum_ok()),
        "a guest-requested reset ends every vCPU cleanly: {:?}",
        outcome.vcpus
    );
}

#[test]
fn two_identical_linux_vms_under_the_disco_policy_boot_and_share() {
    if !disco::kvm_check::require_kvm(
        "two_identical_linux_vms_under_the_disco_policy_boot_and_share",
    ) {
        return;
    }
    // The whole monitor (`disco run`) with the full policy: sharing scanner,
    // copy-on-write, page-fault sampling. Each VM's console goes to a file;
    // the run ends when both VMs end (KVM's emulator stops them at the
    // known `cmpxchg16b` on hosts that emulate guest kernel mode, FACTS.md;
    // the kernel panics without a root disk and resets elsewhere) or at the
    // time limit. Both must have printed the banner and the whole e820 map
    // the monitor built, with their identical kernel images shared.
    let dir = guest_dir();
    let out = std::env::temp_dir().join(format!("disco-linux-twins-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let ram: u64 = 256 << 20;
    let mut text = String::from("policy = \"disco\"\n[host]\ntopology = \"2-socket\"\n");
    for i in 0..2 {
        text += &format!(
            r#"
[[vm]]
name = "linux{i}"
node = {i}
memory_mib = {}
kernel = "{}"
cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 no_timer_check"
serial = "{}"
time_limit_s = 900
"#,
            ram >> 20,
            dir.join("vmlinux").display(),
            out.join(format!("linux{i}.log")).display()
        );
    }
    let report = disco::monitor::run(&config(&text), &disco::monitor::RunOptions::quiet())
        .expect("the monitor runs");
    let rendered = report.render_text();
    eprintln!("{rendered}");
    assert!(report.verify_ok, "invariants: {:?}", report.verify_errors);
    let mut want: Vec<String> = vec!["Linux version".into()];
    want.extend(e820_lines(ram));
    for (i, vm) in report.vms.iter().enumerate() {
        let console = std::fs::read_to_string(out.join(format!("linux{i}.log"))).unwrap();
        eprintln!(
            "---- {} console ({} lines) ----\n{console}\n---- end ----",
            vm.name,
            console.lines().count()
        );
        let missing: Vec<&String> = want
            .iter()
            .filter(|w| !console.contains(w.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{}: lines missing from the console: {missing:?}\n{rendered}",
            vm.name
        );
        assert!(
            vm.shared_pages > 0,
            "{}: the identical kernels share nothing\n{rendered}",
            vm.name
        );
    }
    let sharing = report.sharing.as_ref().expect("sharing ran");
    eprintln!(
        "the two Linux VMs share {} pages ({:.1} MiB saved), {} copy-on-write breaks",
        sharing.memory.sharing_frames,
        sharing.memory.saved_bytes as f64 / (1 << 20) as f64,
        sharing.memory.cow_breaks
    );
    let _ = std::fs::remove_dir_all(&out);
}
