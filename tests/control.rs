//! The control socket of a running monitor: a real run with a real micro-VM,
//! commands sent over a real Unix socket (through the library and through
//! the `disco ctl` binary), a vCPU moved while the guest runs and its pages
//! following under a migrating policy.

mod common;

use std::time::{Duration, Instant};

use disco::control::{send, ControlSocket};
use disco::kvm_check::require_kvm;
use disco::monitor::run_with_control;

#[test]
fn a_vcpu_moved_over_the_control_socket_takes_its_pages_along() {
    if !require_kvm("a_vcpu_moved_over_the_control_socket_takes_its_pages_along") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("disco-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ctl.sock");
    let config = common::parse(
        r#"
policy = "migrate-only"
[host]
topology = "4-node"
[[vm]]
name = "mover"
vcpus = 1
node = 0
memory_mib = 8
workload = { kind = "sweep", seed = 5, passes = 3000 }
[[vm]]
name = "bystander"
node = 1
memory_mib = 2
workload = { kind = "fill", seed = 1 }
"#,
    );
    let socket = ControlSocket::bind(&path).unwrap();
    let client = std::thread::spawn({
        let path = path.clone();
        move || {
            // Wait until the mover runs.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = send(&path, "status").unwrap();
                if s.contains("mover running") {
                    break s;
                }
                assert!(Instant::now() < deadline, "mover never ran: {s}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let ctl = std::thread::spawn({
        let path = path.clone();
        move || {
            let status = client.join().unwrap();
            let cli = std::process::Command::new(env!("CARGO_BIN_EXE_disco"))
                .arg("ctl")
                .arg(&path)
                .args(["move", "nobody", "1"])
                .output()
                .unwrap();
            let cli_out = String::from_utf8_lossy(&cli.stdout).to_string();
            let errors = [
                send(&path, "move mover 4").unwrap(),
                send(&path, "move mover 1 1").unwrap(),
                send(&path, "move mover").unwrap(),
            ];
            let moved = send(&path, "move mover 3").unwrap();
            let after = send(&path, "status").unwrap();
            (status, cli.status.code(), cli_out, errors, moved, after)
        }
    });
    let report =
        run_with_control(&config, &common::run_options(), Some(&socket)).expect("the monitor runs");
    let (status, cli_code, cli_out, errors, moved, after) = ctl.join().unwrap();
    drop(socket);
    assert!(report.all_ok(), "{}", report.render_text());

    assert!(
        status.starts_with("ok: mover running vcpu nodes 0"),
        "{status}"
    );
    assert_eq!(cli_code, Some(1), "a failed command exits 1: {cli_out}");
    assert!(
        cli_out.contains("error: no VM `nobody`; the VMs are: mover, bystander"),
        "{cli_out}"
    );
    assert!(
        errors[0].contains("node 4 does not exist; allowed: 0 to 3"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("has no vCPU 1; allowed: 0 to 0"),
        "{}",
        errors[1]
    );
    assert!(errors[2].starts_with("error: cannot read"), "{}", errors[2]);
    assert!(
        moved.starts_with("ok: at ")
            && moved.contains("all vCPUs moved to node 3 (control socket)"),
        "{moved}"
    );
    assert!(after.contains("mover running vcpu nodes 3"), "{after}");

    let vm = &report.vms[0];
    assert_eq!(vm.vcpus[0].node, 3, "the report shows where the vCPU ended");
    assert!(
        vm.moves.iter().any(|m| m.contains("(control socket)")),
        "{:?}",
        vm.moves
    );
    assert!(
        vm.pages_per_node[3] >= 500,
        "pages should follow the vCPU to node 3: {:?}\n{}",
        vm.pages_per_node,
        report.render_text()
    );
    assert!(!path.exists(), "the socket file is removed after the run");
    std::fs::remove_dir_all(&dir).ok();
}
