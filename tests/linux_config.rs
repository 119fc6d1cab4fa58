//! The Linux-guest keys of `[[vm]]`: good configs parse, each mistake names
//! the file, the key and what is allowed. No KVM needed.

use std::path::PathBuf;

use disco::config::Config;
use disco::linux::SerialOutput;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("disco-linux-config-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["vmlinux", "initrd", "disk.img"] {
        std::fs::write(d.join(f), b"x").unwrap();
    }
    d
}

fn load(text: &str) -> Result<Config, String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir().join(format!("c{n}.toml"));
    std::fs::write(&path, format!("[host]\ntopology = \"2-socket\"\n{text}")).unwrap();
    Config::load(&path).map_err(|e| {
        let e = e.to_string();
        assert!(
            e.starts_with(&path.display().to_string()),
            "names the file: {e}"
        );
        e
    })
}

fn err(text: &str, parts: &[&str]) {
    let e = load(text).expect_err("must be rejected");
    for p in parts {
        assert!(e.contains(p), "expected `{p}` in: {e}");
    }
}

#[test]
fn a_linux_vm_parses_with_paths_relative_to_the_config() {
    let c = load(
        r#"
[[vm]]
name = "lx"
count = 2
vcpu_nodes = [0, 1]
memory_mib = 128
kernel = "vmlinux"
initramfs = "initrd"
cmdline = "console=ttyS0"
disk = [{ path = "disk.img", read_only = true }, { path = "disk.img" }]
serial = "out-{vm}.log"
virtio_console = true
"#,
    )
    .unwrap();
    assert_eq!(c.vms.len(), 2);
    let l = c.vms[1].linux.as_ref().unwrap();
    assert_eq!(l.kernel, dir().join("vmlinux"));
    assert_eq!(l.initramfs, Some(dir().join("initrd")));
    assert_eq!(l.disks.len(), 2);
    assert!(l.disks[0].read_only && !l.disks[1].read_only);
    assert_eq!(l.serial, SerialOutput::File(dir().join("out-lx-1.log")));
    assert!(l.virtio_console);
    assert!(load("[[vm]]\nname = \"m\"\n").unwrap().vms[0]
        .linux
        .is_none());
}

#[test]
fn linux_key_mistakes_are_named() {
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"vmlinux\"\nworkload = { kind = \"spin\" }\n",
        &["vm[0].workload", "not both"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"\"\n",
        &["vm[0].kernel", "is empty", "file path"],
    );
    err(
        "[[vm]]\nname = \"a\"\ninitramfs = \"initrd\"\n",
        &["vm[0].initramfs", "only allowed with `kernel`"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 32\nkernel = \"vmlinux\"\n",
        &["vm[0].memory_mib", "64 to 3072"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"vmlinux\"\ndisk = [{ read_only = true }]\n",
        &["vm[0].disk[0].path", "is required"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"vmlinux\"\ndisk = [{ path = \"disk.img\", ro = true }]\n",
        &["vm[0].disk[0].ro", "unknown key", "read_only"],
    );
    err(
        "[[vm]]\nname = \"a\"\ncount = 2\nmemory_mib = 128\nkernel = \"vmlinux\"\nserial = \"out.log\"\n",
        &["vm[0].serial", "{vm}"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"vmlinux\"\nmoves = [{ after_ms = 10, node = 1 }]\n",
        &["vm[0].moves", "micro-guests"],
    );
    err(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\nkernel = \"vmlinux\"\nvirtio_console = 1\n",
        &["vm[0].virtio_console", "true or false"],
    );
}
