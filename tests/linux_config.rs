//! The Linux-guest keys of `[[vm]]`: good configs parse, each mistake names
//! the file, the key and what is allowed. No KVM needed.

use std::path::PathBuf;

mod common;

use disco::config::Config;
use disco::linux::SerialOutput;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("disco-linux-config-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    // Written once, atomically (tests run in parallel and the config check
    // reads the files: a file being rewritten would look empty). A disk
    // holds at least one sector.
    static FILES: std::sync::Once = std::sync::Once::new();
    FILES.call_once(|| {
        for (f, content) in [
            ("vmlinux", &b"x"[..]),
            ("initrd", b"x"),
            ("disk.img", &[0u8; 512]),
        ] {
            std::fs::write(d.join(f), content).unwrap();
        }
    });
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

/// The error for a VM with these Linux keys (128 MiB of RAM), within 30 s.
fn err_within(keys: String, parts: &[&str]) {
    let text = format!("[[vm]]\nname = \"a\"\nmemory_mib = 128\n{keys}");
    let e = common::within(&format!("loading {keys:?}"), move || {
        load(&text).expect_err("must be rejected")
    });
    for p in parts {
        assert!(e.contains(p), "expected `{p}` in: {e}");
    }
}

#[test]
fn kernel_and_initramfs_must_be_regular_files_that_fit_in_ram() {
    let d = dir();
    common::mkfifo(&d.join("kernel.fifo"));
    // Sparse, one byte more than the VM's 128 MiB.
    std::fs::File::create(d.join("huge"))
        .unwrap()
        .set_len((128 << 20) + 1)
        .unwrap();
    std::fs::File::create(d.join("half"))
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    err_within(
        "kernel = \"/dev/zero\"\n".into(),
        &[
            "vm[0].kernel",
            "/dev/zero is a character device; allowed: a regular file",
        ],
    );
    err_within(
        "kernel = \"kernel.fifo\"\n".into(),
        &[
            "vm[0].kernel",
            "is a FIFO (named pipe); allowed: a regular file",
        ],
    );
    err_within(
        "kernel = \"vmlinux\"\ninitramfs = \"kernel.fifo\"\n".into(),
        &["vm[0].initramfs", "is a FIFO (named pipe)"],
    );
    err_within(
        "kernel = \".\"\n".into(),
        &["vm[0].kernel", "is a directory; allowed: a regular file"],
    );
    err_within(
        "kernel = \"nosuch\"\n".into(),
        &["vm[0].kernel", "nosuch cannot be opened: No such file"],
    );
    err_within(
        "kernel = \"huge\"\n".into(),
        &[
            "vm[0].kernel",
            "huge is 128.0 MiB; allowed: a file no larger than the VM's RAM (128.0 MiB, memory_mib)",
        ],
    );
    err_within(
        "kernel = \"half\"\ninitramfs = \"half\"\n".into(),
        &["vm[0].initramfs", "together are larger than the VM's RAM"],
    );
}

#[test]
fn disks_must_be_files_or_block_devices_and_writable_unless_read_only() {
    let d = dir();
    common::mkfifo(&d.join("disk.fifo"));
    let disk = |path: &str, ro: bool| {
        format!("kernel = \"vmlinux\"\ndisk = [{{ path = \"{path}\", read_only = {ro} }}]\n")
    };
    err_within(
        disk(".", false),
        &[
            "vm[0].disk[0].path",
            "is a directory; allowed: a regular file or a block device",
        ],
    );
    err_within(
        disk("disk.fifo", true),
        &["vm[0].disk[0].path", "is a FIFO (named pipe)"],
    );
    // Even root cannot write a read-only sysfs attribute (EACCES at open).
    let sysfs = "/sys/devices/system/cpu/online";
    err_within(
        disk(sysfs, false),
        &[
            "vm[0].disk[0].path",
            "cannot be opened for writing: Permission denied",
            "`read_only = true`",
        ],
    );
    // Root may open /proc/version for writing (the write then fails with
    // EIO); like every /proc file it reports 0 bytes: no sector to serve.
    err_within(
        disk("/proc/version", false),
        &[
            "vm[0].disk[0].path",
            "/proc/version is 0 bytes; allowed: a disk image of at least one 512-byte sector",
        ],
    );
    // The same sysfs file read-only is a (4 KiB) disk that can be read.
    let text = format!(
        "[[vm]]\nname = \"a\"\nmemory_mib = 128\n{}",
        disk(sysfs, true)
    );
    let c = load(&text).unwrap();
    assert!(c.vms[0].linux.as_ref().unwrap().disks[0].read_only);
}
