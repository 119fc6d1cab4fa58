//! Live migration between two `disco serve` processes (the built binary,
//! real KVM): a running guest moves and finishes on the target with its
//! checksum verified and nothing left on the source; a pair of VMs that
//! share pages moves together and shares them on the target; a connection
//! cut at many points (a proxy that closes after N bytes) leaves the VM
//! running on the source every time and nothing on the target; the target
//! refuses a foreign stream, another protocol version and a name in use.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use disco::api::client::Answer;
use disco::kvm_check::require_kvm;
use disco::migration::wire::{self, Msg};
use serde_json::{json, Value};

mod common;
use common::serve::{checksums_verified, free_port, Serve};

/// `disco serve` under the static policy on the 4-node fixture, taking
/// migrations when `listen` (see `common::serve`).
impl Serve {
    fn start(name: &str, listen: bool) -> Serve {
        let args = ["--topology", "4-node", "--policy", "static"];
        let mut serve = Serve::spawn("mig", name, &args, listen, false);
        serve.call_limit = Duration::from_secs(120);
        serve
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port.expect("a listening monitor"))
    }

    fn names(&self) -> Vec<String> {
        self.expect("GET", "/v1/vms", None, 200)["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn add(&self, name: &str, body: Value) {
        self.expect("PUT", &format!("/v1/vms/{name}"), Some(body), 201);
    }

    /// Waits until VM `name` has made progress past `beyond`; returns it.
    fn progress_past(&self, name: &str, beyond: u64) -> u64 {
        let began = Instant::now();
        loop {
            let v = self.vm(name);
            let p = v["progress"][0].as_u64().unwrap();
            if p > beyond {
                return p;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "{name} makes no progress: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until VM `name` has done `share` of its work (a sweeper past
    /// its fill: every page holds data); returns its progress.
    fn progress_share(&self, name: &str, share: f64) -> u64 {
        let began = Instant::now();
        loop {
            let v = self.vm(name);
            let (done, total) = (
                v["progress"][0].as_u64().unwrap(),
                v["progress"][1].as_u64().unwrap(),
            );
            if done as f64 >= share * total as f64 {
                return done;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "{name} makes no progress: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn used_pages(&self) -> u64 {
        self.verified()["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["used_pages"].as_u64().unwrap())
            .sum()
    }

    fn migrate(&self, vms: &[&str], to: &str) -> Answer {
        self.call("POST", "/v1/migrate", Some(json!({"vms": vms, "to": to})))
    }
}

/// A micro-VM sweeping its memory for a good few seconds.
fn sweeper(mib: u64, seed: u64) -> Value {
    json!({"vcpu_nodes": [0], "memory_mib": mib, "time_limit_s": 300,
        "workload": {"kind": "sweep", "seed": seed, "passes": 600}})
}

#[test]
fn a_running_guest_moves_to_another_monitor_and_finishes_there() {
    if !require_kvm("a_running_guest_moves_to_another_monitor_and_finishes_there") {
        return;
    }
    let source = Serve::start("one-src", false);
    let target = Serve::start("one-dst", true);
    source.add("mover", sweeper(32, 5));
    let before = source.progress_share("mover", 0.01);
    let report = source.expect(
        "POST",
        "/v1/migrate",
        Some(json!({"vms": ["mover"], "to": target.addr()})),
        200,
    );
    assert_eq!(report["vms"], json!(["mover"]), "{report}");
    assert!(report["rounds"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["guest_ram_bytes"], 32 << 20, "{report}");
    let distinct = report["distinct_pages"].as_u64().unwrap();
    assert!(distinct > 4096, "a swept guest's pages hold data: {report}");
    assert!(
        report["bytes_sent"].as_u64().unwrap() >= distinct * 4096,
        "{report}"
    );
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime < 2000.0, "{report}");
    // Nothing left on the source: no VM, no page, verify holds.
    assert!(source.names().is_empty(), "{:?}", source.names());
    assert_eq!(source.used_pages(), 0);
    // The target runs it on from where it was, to the right checksum.
    let v = target.vm("mover");
    assert!(v["progress"][0].as_u64().unwrap() >= before, "{v}");
    let done = target.wait_finished("mover", Duration::from_secs(120));
    assert!(checksums_verified(&done), "{done}");
    target.verified();

    // The thin client: `disco ctl migrate` prints the report; a second
    // guest goes back the other way... to a monitor that does not listen,
    // which fails and leaves it running.
    target.add("back", sweeper(16, 6));
    target.progress_past("back", 0);
    let out = Command::new(env!("CARGO_BIN_EXE_disco"))
        .arg("ctl")
        .arg(&target.socket)
        .args(["migrate", "back", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("migration failed") && err.contains("connecting"),
        "{err}"
    );
    assert_eq!(target.vm("back")["state"], "running");
    let second = Serve::start("one-dst2", true);
    let out = Command::new(env!("CARGO_BIN_EXE_disco"))
        .arg("ctl")
        .arg(&target.socket)
        .args(["migrate", "back", &second.addr()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("migrated back to"), "{text}");
    assert!(text.contains("downtime"), "{text}");
    let done = second.wait_finished("back", Duration::from_secs(120));
    assert!(checksums_verified(&done), "{done}");
    assert_eq!(target.names(), vec!["mover".to_string()]);
}

#[test]
fn a_sharing_pair_migrates_together_and_shares_on_the_target() {
    if !require_kvm("a_sharing_pair_migrates_together_and_shares_on_the_target") {
        return;
    }
    let source = Serve::start("pair-src", false);
    let target = Serve::start("pair-dst", true);
    // Two readers of one table from one seed: its pages are identical in
    // both and stay so.
    let reader = |seed: u64| {
        json!({"vcpu_nodes": [0], "memory_mib": 16, "time_limit_s": 300,
            "workload": {"kind": "table_scan", "seed": seed, "table_pages": 2048,
                "lookups": 400_000_000u64, "write_after": 0}})
    };
    source.add("left", reader(9));
    source.add("right", reader(9));
    source.progress_share("left", 0.01);
    source.progress_share("right", 0.01);
    let report = source.expect(
        "POST",
        "/v1/migrate",
        Some(json!({"vms": ["left", "right"], "to": target.addr()})),
        200,
    );
    let referenced = report["pages_referenced"].as_u64().unwrap();
    assert!(
        referenced >= 2048,
        "the second VM's table went as references: {report}"
    );
    let carried = report["pages_carried"].as_u64().unwrap();
    assert!(carried < 2 * 2048, "{report}");
    assert!(source.names().is_empty());
    assert_eq!(source.used_pages(), 0);
    // Mapped shared on the target from the start.
    let stats = target.verified();
    let shared = stats["sharing"]["shared_machine_pages"].as_u64().unwrap();
    assert!(shared >= 2000, "{}", stats["sharing"]);
    for name in ["left", "right"] {
        assert!(target.vm(name)["shared_pages"].as_u64().unwrap() >= 2000);
        let done = target.wait_finished(name, Duration::from_secs(240));
        assert!(checksums_verified(&done), "{name}: {done}");
    }
    target.verified();
}

/// A proxy for one connection that forwards both ways and closes both
/// once `limit` bytes went from the source to the target; `cut()` says
/// whether it did.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(to: &str, limit: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to = to.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let thread = std::thread::spawn(move || {
            let (from, _) = listener.accept().unwrap();
            let target = TcpStream::connect(&to).unwrap();
            let (mut up_r, mut up_w) = (from.try_clone().unwrap(), target.try_clone().unwrap());
            let (mut down_r, mut down_w) = (target.try_clone().unwrap(), from.try_clone().unwrap());
            let down = std::thread::spawn(move || {
                let _ = std::io::copy(&mut down_r, &mut down_w);
            });
            let mut sent = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match up_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if sent + n as u64 > limit {
                    // Part of this read goes; the rest never arrives.
                    let room = (limit - sent) as usize;
                    let _ = up_w.write_all(&buf[..room]);
                    flag.store(true, Ordering::SeqCst);
                    break;
                }
                if up_w.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = target.shutdown(std::net::Shutdown::Both);
            let _ = down.join();
        });
        Proxy {
            port,
            cut,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn finish(mut self) -> bool {
        let _ = self.thread.take().unwrap().join();
        self.cut.load(Ordering::SeqCst)
    }
}

#[test]
fn a_cut_connection_leaves_the_vm_running_on_the_source_and_nothing_on_the_target() {
    if !require_kvm(
        "a_cut_connection_leaves_the_vm_running_on_the_source_and_nothing_on_the_target",
    ) {
        return;
    }
    let source = Serve::start("cut-src", false);
    let target = Serve::start("cut-dst", true);
    // A full migration's size, from a twin that goes all the way.
    source.add("twin", sweeper(16, 3));
    source.progress_share("twin", 0.01);
    let twin = source.expect(
        "POST",
        "/v1/migrate",
        Some(json!({"vms": ["twin"], "to": target.addr()})),
        200,
    );
    let total = twin["bytes_sent"].as_u64().unwrap();
    let done = target.wait_finished("twin", Duration::from_secs(120));
    assert!(checksums_verified(&done), "{done}");
    target.expect("DELETE", "/v1/vms/twin", None, 200);
    let used = target.used_pages();
    assert_eq!(used, 0);
    let target_vms: Vec<String> = Vec::new();

    source.add("stayer", sweeper(16, 4));
    let mut progress = source.progress_share("stayer", 0.01);
    // Fixed points (inside the handshake, the first frame, the VMs'
    // description) and seeded random ones across the whole stream.
    let mut points = vec![0u64, 5, 12, 40, 200, 5_000];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Within the first half: the stayer's stream may be shorter.
        points.push(x % (total / 2));
    }
    points.push(total * 45 / 100);
    let mut cuts = 0;
    // A stream can be shorter than the twin's (fewer pages dirtied between
    // rounds, which depends on the host's load): a point past its end cuts
    // nothing, and the VM has then moved.
    let mut moved = false;
    for &n in &points {
        let proxy = Proxy::start(&target.addr(), n);
        let answer = source.migrate(&["stayer"], &proxy.addr());
        let cut = proxy.finish();
        if !cut {
            // The stream was shorter than `n`: it must have gone through.
            assert_eq!(answer.status, 200, "cut at {n} of {total}: {}", answer.body);
            moved = true;
            break;
        }
        cuts += 1;
        assert_eq!(answer.status, 502, "cut at {n}: {}", answer.body);
        assert!(
            answer.body.contains("the VMs run on here"),
            "cut at {n}: {}",
            answer.body
        );
        // Running on the source, going on, memory consistent.
        let v = source.vm("stayer");
        assert_eq!(v["state"], "running", "cut at {n}: {v}");
        progress = source.progress_past("stayer", progress);
        source.verified();
        // Nothing taken on the target.
        let began = Instant::now();
        loop {
            let (now, names) = (target.used_pages(), target.names());
            if now == used && names == target_vms {
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(40),
                "cut at {n}: the target kept {names:?}, {now} pages (had {used})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        cuts >= 8,
        "only {cuts} of {} points cut the stream",
        points.len()
    );
    // After all that it still migrates, and finishes right on the target.
    if !moved {
        source.expect(
            "POST",
            "/v1/migrate",
            Some(json!({"vms": ["stayer"], "to": target.addr()})),
            200,
        );
    }
    let done = target.wait_finished("stayer", Duration::from_secs(120));
    assert!(checksums_verified(&done), "{done}");
    assert!(source.names().is_empty());
    target.verified();
}

/// Sends a Hello of `version` on a raw connection; returns the answer.
fn hello(addr: &str, magic: [u8; 8], version: u32) -> Msg {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = BufWriter::new(s.try_clone().unwrap());
    wire::send(
        &mut w,
        &Msg::Hello {
            magic,
            version,
            sender: "a test".into(),
        },
        &[],
    )
    .unwrap();
    w.flush().unwrap();
    wire::recv(&mut BufReader::new(s)).unwrap().0
}

#[test]
fn the_target_refuses_foreign_streams_other_versions_and_names_in_use() {
    if !require_kvm("the_target_refuses_foreign_streams_other_versions_and_names_in_use") {
        return;
    }
    let source = Serve::start("refuse-src", false);
    let target = Serve::start("refuse-dst", true);
    let addr = target.addr();
    // Another protocol version.
    match hello(&addr, wire::MAGIC, wire::VERSION + 1) {
        Msg::Refuse { reason } => assert!(
            reason.contains(&format!("version {}", wire::VERSION + 1))
                && reason.contains(&format!("only version {}", wire::VERSION)),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // Someone else's magic.
    match hello(&addr, *b"NOTDISCO", wire::VERSION) {
        Msg::Refuse { reason } => assert!(reason.contains("not a disco migration"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Plain text.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let answer = wire::recv(&mut got.as_slice());
    match answer {
        Ok((Msg::Refuse { reason }, _)) => {
            assert!(reason.contains("not a disco migration"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A name the target already runs: refused, the VM runs on here.
    target.add("taken", sweeper(16, 1));
    source.add("taken", sweeper(16, 2));
    let p = source.progress_past("taken", 0);
    let a = source.migrate(&["taken"], &addr);
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body.contains("refused") && a.body.contains("taken"),
        "{}",
        a.body
    );
    assert_eq!(source.vm("taken")["state"], "running");
    source.progress_past("taken", p);
    source.verified();
    assert_eq!(target.names(), vec!["taken".to_string()]);
    // Bad requests name their field.
    let e = source.expect("POST", "/v1/migrate", Some(json!({"to": addr})), 400);
    assert_eq!(e["field"], "vms", "{e}");
    let e = source.expect("POST", "/v1/migrate", Some(json!({"vms": ["taken"]})), 400);
    assert_eq!(e["field"], "to", "{e}");
    let e = source.expect(
        "POST",
        "/v1/migrate",
        Some(json!({"vms": ["nobody"], "to": addr})),
        404,
    );
    assert_eq!(e["field"], "name", "{e}");
    assert_eq!(target.names(), vec!["taken".to_string()]);
    target.verified();
}
