//! The REST API of a long-lived monitor: the built `disco serve` binary
//! with real micro-VMs, driven over its Unix socket by the library's HTTP
//! client. VMs added by PUT, paused, resumed, moved, finished with their
//! checksums verified, removed with `verify()` still holding; bad requests
//! answered with 4xx JSON errors naming the field; an oversize body 413;
//! an idle client and many concurrent ones block nobody; the pmap and the
//! memmap streamed in pieces and agreeing with the monitor's own; rates
//! events; page sampling turned on and off while VMs run; `disco run
//! --api` showing a finished VM's result while another runs.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use disco::api::client::request;
use disco::kvm_check::require_kvm;
use serde_json::{json, Value};

mod common;
use common::serve::{checksums_verified, Serve};

/// `disco serve` on the 4-node fixture with a JSON report (see
/// `common::serve`).
impl Serve {
    fn start(name: &str, policy: &str) -> Serve {
        let args = ["--topology", "4-node", "--policy", policy, "--json"];
        Serve::spawn("api", name, &args, false, true)
    }

    /// SIGINT: the monitor stops, reports (JSON) and exits; returns the report.
    fn stop(mut self) -> Value {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "report: {e}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(!self.socket.exists(), "the API socket is removed");
        report
    }
}

#[test]
fn vms_come_and_go_through_the_api_and_memory_stays_consistent() {
    if !require_kvm("vms_come_and_go_through_the_api_and_memory_stays_consistent") {
        return;
    }
    let s = Serve::start("lifecycle", "disco");
    assert_eq!(s.expect("GET", "/v1/vms", None, 200), json!({"vms": []}));
    let mode = std::fs::metadata(&s.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let long = json!({"vcpus": 1, "node": 1, "memory_mib": 8,
        "workload": {"kind": "sweep", "seed": 5, "passes": 3000}});
    let a = s.expect("PUT", "/v1/vms/long", Some(long), 201);
    assert_eq!(a["name"], "long");
    assert_eq!(a["vcpu_nodes"], json!([1]));
    assert_eq!(a["pages_per_node"][1], 2048);
    let short = json!({"memory_mib": 4, "workload": {"kind": "fill", "seed": 3}});
    s.expect("PUT", "/v1/vms/short", Some(short), 201);
    let listed = s.expect("GET", "/v1/vms", None, 200);
    assert_eq!(listed["vms"].as_array().unwrap().len(), 2);
    s.verified();

    // Paused, the guest makes no progress; resumed, it goes on.
    let p = s.expect("POST", "/v1/vms/long/pause", None, 200);
    assert_eq!(p["state"], "paused");
    let before = s.vm("long")["progress"][0].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = s.vm("long");
    assert_eq!(after["state"], "paused");
    assert_eq!(
        after["progress"][0].as_u64().unwrap(),
        before,
        "a paused VM ran"
    );
    let r = s.expect("POST", "/v1/vms/long/resume", None, 200);
    assert_eq!(r["state"], "running");
    let moved = s.expect("POST", "/v1/vms/long/move", Some(json!({"node": 2})), 200);
    assert_eq!(moved["vm"]["vcpu_nodes"], json!([2]), "{moved}");

    // A third VM while the first runs.
    let third = json!({"memory_mib": 4, "workload": {"kind": "fill", "seed": 3}});
    s.expect("PUT", "/v1/vms/third", Some(third), 201);

    for name in ["short", "third", "long"] {
        let v = s.wait_finished(name, Duration::from_secs(120));
        assert_eq!(v["result"]["status"], "ok", "{v}");
        assert!(checksums_verified(&v), "{v}");
    }
    let long = s.vm("long");
    assert!(long["result"]["moves"][0]
        .as_str()
        .unwrap()
        .contains("moved to node 2 (API)"));

    // The pmap covers every frame of the VM, and agrees with its pages per node.
    let pmap = s.expect("GET", "/v1/vms/short/pmap", None, 200);
    let runs = pmap["runs"].as_array().unwrap();
    let frames: u64 = runs.iter().map(|r| r["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames, 1024, "{pmap}");
    let short = s.vm("short");
    let mut per_node = [0u64; 4];
    for r in runs {
        per_node[r["node"].as_u64().unwrap() as usize] += r["frames"].as_u64().unwrap();
    }
    assert_eq!(json!(per_node), short["pages_per_node"]);
    let memmap = s.expect("GET", "/v1/memmap", None, 200);
    assert_eq!(memmap["nodes"].as_array().unwrap().len(), 4);

    // Removing a VM gives its pages back; the invariants still hold.
    let used = |stats: &Value| -> u64 {
        stats["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["used_pages"].as_u64().unwrap())
            .sum()
    };
    let before = used(&s.verified());
    let removed = s.expect("DELETE", "/v1/vms/third", None, 200);
    assert_eq!(removed["status"], "ok");
    let after = s.verified();
    let third_pages: u64 = removed["pages_per_node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .sum();
    assert!(
        used(&after) <= before - third_pages + removed["shared_pages"].as_u64().unwrap(),
        "pages not given back: {before} -> {}",
        used(&after)
    );
    s.expect("GET", "/v1/vms/third", None, 404);

    // The policy swapped while the monitor runs; a bad one refused.
    let swapped = s.expect(
        "PUT",
        "/v1/policy",
        Some(json!({"sharing": {"enabled": true, "pages_per_second": 5000}, "numa": {"migrate": true}})),
        200,
    );
    assert_eq!(
        swapped["policy"]["sharing"]["pages_per_second"], 5000,
        "{swapped}"
    );
    assert_eq!(
        s.expect("GET", "/v1/policy", None, 200)["policy"]["numa"]["migrate"],
        true
    );
    s.verified();

    // A running VM removed mid-run.
    let spinner = json!({"memory_mib": 4, "time_limit_s": 120, "workload": {"kind": "spin"}});
    s.expect("PUT", "/v1/vms/spinner", Some(spinner), 201);
    std::thread::sleep(Duration::from_millis(200));
    let gone = s.expect("DELETE", "/v1/vms/spinner", None, 200);
    assert_eq!(gone["status"], "stopped", "{gone}");
    s.verified();

    let events = request(
        &s.socket,
        "GET",
        "/v1/events",
        None,
        Duration::from_millis(700),
    );
    // The stream stays open: the request times out, having sent events.
    assert!(events.is_err());

    let report = s.stop();
    assert_eq!(report["verify_ok"], true, "{}", report["verify_errors"]);
    let names: Vec<&str> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["long", "short"]);
    // verify_ok covers the teardown too: every pool empty after it.
}

#[test]
fn bad_requests_get_4xx_json_errors_naming_the_field() {
    if !require_kvm("bad_requests_get_4xx_json_errors_naming_the_field") {
        return;
    }
    let s = Serve::start("errors", "static");
    let check = |method: &str, uri: &str, body: Option<&[u8]>, status: u16, field: Value| {
        let a = request(&s.socket, method, uri, body, Duration::from_secs(10)).unwrap();
        assert_eq!(a.status, status, "{method} {uri}: {}", a.body);
        let j = a.json();
        assert!(
            j["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}",
            a.body
        );
        assert_eq!(j["field"], field, "{}", a.body);
        j["error"].as_str().unwrap().to_string()
    };
    let e = check("GET", "/v1/vms/nobody", None, 404, json!("name"));
    assert!(e.contains("no VM `nobody`"), "{e}");
    check(
        "PUT",
        "/v1/vms/x",
        Some(b"{\"memory_mib\": "),
        400,
        Value::Null,
    );
    let e = check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"memory": 4}"#),
        400,
        json!("memory"),
    );
    assert!(e.contains("unknown key; allowed here:"), "{e}");
    let e = check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"node": 4}"#),
        400,
        json!("node"),
    );
    assert!(e.contains("allowed: 0 to 3"), "{e}");
    check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"workload": {"kind": "fill", "seeds": 1}}"#),
        400,
        json!("workload.seeds"),
    );
    check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"name": "y"}"#),
        400,
        json!("name"),
    );
    check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"count": 2}"#),
        400,
        json!("count"),
    );
    check(
        "PUT",
        "/v1/vms/x",
        Some(br#"{"vcpus": null}"#),
        400,
        json!("vcpus"),
    );
    check("PUT", "/v1/vms/bad%20name", Some(b"{}"), 400, json!("name"));

    let spin = br#"{"memory_mib": 2, "time_limit_s": 120, "workload": {"kind": "spin"}}"#;
    let a = request(
        &s.socket,
        "PUT",
        "/v1/vms/x",
        Some(spin),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let e = check("PUT", "/v1/vms/x", Some(spin), 409, json!("name"));
    assert!(e.contains("names must be unique"), "{e}");
    check(
        "POST",
        "/v1/vms/x/move",
        Some(br#"{"node": 9}"#),
        400,
        json!("node"),
    );
    check(
        "POST",
        "/v1/vms/x/move",
        Some(br#"{"node": 1, "vcpu": 5}"#),
        400,
        json!("vcpu"),
    );
    check(
        "POST",
        "/v1/vms/x/move",
        Some(br#"{"nodes": 1}"#),
        400,
        json!("nodes"),
    );
    check("POST", "/v1/vms/nobody/pause", None, 404, json!("name"));
    check(
        "PUT",
        "/v1/policy",
        Some(br#"{"sharing": {"enable": true}}"#),
        400,
        json!("sharing.enable"),
    );
    check(
        "PUT",
        "/v1/policy",
        Some(br#"{"numa": {"decay": 5}}"#),
        400,
        json!("numa.decay"),
    );
    check("GET", "/v1/stats?verify=maybe", None, 400, json!("verify"));
    check("GET", "/v1/nothing", None, 404, Value::Null);
    check("DELETE", "/v1/stats", None, 405, Value::Null);

    // 10 MB: refused with 413 from its Content-Length, without being read
    // (the server answers and closes while the client still writes).
    let mut raw = UnixStream::connect(&s.socket).unwrap();
    let size = 10 << 20;
    raw.write_all(
        format!(
            "PUT /v1/vms/big HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {size}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let chunk = vec![b' '; 64 << 10];
    for _ in 0..size / chunk.len() {
        if raw.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = std::io::Read::read_to_string(&mut raw, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error\":\"the request body is larger than"),
        "{answer}"
    );

    // The guest ran through all of it.
    let x = s.expect("GET", "/v1/vms/x", None, 200);
    assert_eq!(x["state"], "running", "{x}");
    s.expect("POST", "/v1/vms/x/stop", None, 200);
    s.wait_finished("x", Duration::from_secs(10));
    let report = s.stop();
    assert_eq!(report["verify_ok"], true, "{}", report["verify_errors"]);
    assert_eq!(
        report["vms"][0]["status"], "stopped",
        "{}",
        report["vms"][0]
    );
}

#[test]
fn an_idle_client_blocks_nobody_and_many_clients_are_answered() {
    if !require_kvm("an_idle_client_blocks_nobody_and_many_clients_are_answered") {
        return;
    }
    let s = Serve::start("clients", "disco");
    let guest = json!({"vcpus": 1, "memory_mib": 8, "workload": {"kind": "sweep", "seed": 9, "passes": 500}});
    s.expect("PUT", "/v1/vms/g", Some(guest), 201);
    // Connected and silent; another half-way through its request headers.
    let _idle = UnixStream::connect(&s.socket).unwrap();
    let mut partial = UnixStream::connect(&s.socket).unwrap();
    partial
        .write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let began = Instant::now();
    s.expect("GET", "/v1/vms", None, 200);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );

    let socket: &Path = &s.socket;
    let answered: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                scope.spawn(move || {
                    let uri = match i % 3 {
                        0 => "/v1/vms",
                        1 => "/v1/vms/g",
                        _ => "/v1/stats",
                    };
                    request(socket, "GET", uri, None, Duration::from_secs(60))
                        .map(|a| a.status)
                        .unwrap_or(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answered.iter().all(|&c| c == 200), "{answered:?}");
    let v = s.wait_finished("g", Duration::from_secs(120));
    assert_eq!(v["result"]["status"], "ok", "{v}");
    assert!(checksums_verified(&v));

    // `disco ctl` is a client of the same API.
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_disco"))
            .arg("ctl")
            .arg(&s.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = ctl(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.trim(), "g finished vcpu nodes 0 result ok");
    let (code, out) = ctl(&["pause", "nobody"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.trim(), "error: no VM `nobody`; the VMs are: g");
    let (code, out) = ctl(&["show", "g"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "finished"
    );

    let report = s.stop();
    assert_eq!(report["verify_ok"], true, "{}", report["verify_errors"]);
}

#[test]
fn disco_top_shows_every_vm_in_a_real_terminal_and_quits_on_q() {
    if !require_kvm("disco_top_shows_every_vm_in_a_real_terminal_and_quits_on_q") {
        return;
    }
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "this test runs `disco top` in tmux, which is missing: scripts/install-deps.sh installs it"
    );
    let s = Serve::start("top", "disco");
    for (name, passes) in [("alpha", 3000), ("beta", 3000), ("gamma", 1)] {
        let vm =
            json!({"memory_mib": 8, "workload": {"kind": "sweep", "seed": 2, "passes": passes}});
        s.expect("PUT", &format!("/v1/vms/{name}"), Some(vm), 201);
    }
    let session = format!("disco-top-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("tmux runs");
    let command = format!(
        "{} top --api {}; echo TOP-EXITED $?; sleep 60",
        env!("CARGO_BIN_EXE_disco"),
        s.socket.display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "30",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let capture = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-t", &session, "-p"]).stdout).into_owned()
    };
    let began = Instant::now();
    let screen = loop {
        let screen = capture();
        if ["alpha", "beta", "gamma", "machine memory", "node 3"]
            .iter()
            .all(|w| screen.contains(w))
        {
            break screen;
        }
        if began.elapsed() > Duration::from_secs(2) {
            let _ = tmux(&["kill-session", "-t", &session]);
            panic!("disco top did not show every VM within 2 s:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(screen.contains("verify ok"), "{screen}");
    tmux(&["send-keys", "-t", &session, "q"]);
    let began = Instant::now();
    loop {
        let screen = capture();
        if screen.contains("TOP-EXITED 0") {
            break;
        }
        if began.elapsed() > Duration::from_secs(5) {
            let _ = tmux(&["kill-session", "-t", &session]);
            panic!("disco top did not exit on q:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tmux(&["kill-session", "-t", &session]);
}

/// Sends `GET uri` over a raw connection and reads for at most `limit`
/// (event streams never end): the response head and the de-chunked body
/// read so far.
fn raw_get(socket: &Path, uri: &str, limit: Duration) -> (String, String) {
    let mut c = UnixStream::connect(socket).unwrap();
    write!(
        c,
        "GET {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let deadline = Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        c.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match std::io::Read::read(&mut c, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, mut rest) = text.split_once("\r\n\r\n").expect("a response head");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (head.to_string(), rest.to_string());
    }
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            body.push_str(&after[..size.min(after.len())]);
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    (head.to_string(), body)
}

/// Newline-delimited JSON lines.
fn ndjson(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A monitor in this process with its API, and a thread doing what `disco
/// serve`'s loop does (tick every 10 ms), so the test can compare what the
/// API streams with what the monitor itself says.
struct InProcess {
    monitor: std::sync::Arc<parking_lot::Mutex<disco::monitor::Monitor>>,
    server: Option<disco::api::Server>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl InProcess {
    fn start(name: &str, policy: &str) -> InProcess {
        let topology = disco::topology::Topology::from_fixture_name("4-node").unwrap();
        let policy = disco::config::load_policy(policy, Path::new(".")).unwrap();
        let mut monitor =
            disco::monitor::Monitor::new(topology, policy, "<test>", Duration::from_millis(200))
                .unwrap();
        monitor.collect_finished(true);
        monitor.start_services(0).unwrap();
        let monitor = std::sync::Arc::new(parking_lot::Mutex::new(monitor));
        let dir = std::env::temp_dir().join(format!("disco-api-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = disco::api::Server::start(&dir.join("api.sock"), monitor.clone()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = {
            let (monitor, stop) = (monitor.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    {
                        let mut m = monitor.lock();
                        m.tick();
                        m.verify_if_due();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        InProcess {
            monitor,
            server: Some(server),
            stop,
            ticker: Some(ticker),
            dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn expect(&self, method: &str, uri: &str, body: Option<Value>, status: u16) -> Value {
        let body = body.map(|b| b.to_string());
        let a = request(
            &self.socket(),
            method,
            uri,
            body.as_deref().map(str::as_bytes),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{method} {uri}: {e:#}"));
        assert_eq!(a.status, status, "{method} {uri}: {}", a.body);
        a.json()
    }

    /// Stops serving and ticking, finishes the monitor; returns its report.
    fn finish(mut self) -> disco::report::RunReport {
        self.server.take();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.ticker.take().unwrap().join().unwrap();
        let monitor = std::sync::Arc::try_unwrap(std::mem::replace(
            &mut self.monitor,
            std::sync::Arc::new(parking_lot::Mutex::new(
                disco::monitor::Monitor::new(
                    disco::topology::Topology::from_fixture_name("1-node").unwrap(),
                    disco::config::load_policy("static", Path::new(".")).unwrap(),
                    "<placeholder>",
                    Duration::from_secs(1),
                )
                .unwrap(),
            )),
        ))
        .ok()
        .expect("nobody else holds the monitor")
        .into_inner();
        monitor
            .finish(None, &indicatif::ProgressBar::hidden(), 0.0)
            .unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.server.take();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_streamed_pmap_and_memmap_agree_with_the_monitor() {
    if !require_kvm("the_streamed_pmap_and_memmap_agree_with_the_monitor") {
        return;
    }
    let p = InProcess::start("streams", "disco");
    // Two VMs of identical content on different nodes (the scanner merges
    // them and releases their zero pages) and a 1 GiB one that spins.
    for (name, node) in [("twin0", 0), ("twin1", 1)] {
        let vm = json!({"memory_mib": 16, "node": node, "workload": {"kind": "fill", "seed": 3}});
        p.expect("PUT", &format!("/v1/vms/{name}"), Some(vm), 201);
    }
    let big =
        json!({"memory_mib": 1024, "node": 2, "time_limit_s": 120, "workload": {"kind": "spin"}});
    p.expect("PUT", "/v1/vms/big", Some(big), 201);
    let began = Instant::now();
    for name in ["twin0", "twin1"] {
        loop {
            let v = p.expect("GET", &format!("/v1/vms/{name}"), None, 200);
            if v["state"] == "finished" && v["result"]["status"] != "exited" {
                assert_eq!(v["result"]["status"], "ok", "{v}");
                assert!(checksums_verified(&v), "{v}");
                break;
            }
            assert!(began.elapsed() < Duration::from_secs(120), "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Merges happen; a rates event says so.
    let began = Instant::now();
    let rates = loop {
        let (_, body) = raw_get(&p.socket(), "/v1/events", Duration::from_millis(1500));
        let rates: Vec<Value> = ndjson(&body)
            .into_iter()
            .filter(|e| e["kind"] == "rates" && e["rates"]["merges_per_s"].as_f64() > Some(0.0))
            .collect();
        if !rates.is_empty() {
            break rates;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no rates event with merges: {body}"
        );
    };
    assert!(
        rates[0]["rates"]["interval_ms"].as_u64().unwrap() >= 1000,
        "{}",
        rates[0]
    );
    // Until the scanner has merged the twins' common pages, then stopped
    // (a static policy), so the pmaps hold still while they are compared.
    let began = Instant::now();
    while p.expect("GET", "/v1/stats", None, 200)["sharing"]["shared_machine_pages"]
        .as_u64()
        .unwrap()
        < 1000
    {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "the twins were not merged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.expect(
        "PUT",
        "/v1/policy",
        Some(
            json!({"sharing": {"enabled": false}, "numa": {"migrate": false, "replicate": false}}),
        ),
        200,
    );

    for name in ["twin0", "twin1", "big"] {
        let own = serde_json::to_value(p.monitor.lock().pmap(name).unwrap()).unwrap();
        let doc = p.expect("GET", &format!("/v1/vms/{name}/pmap"), None, 200);
        assert_eq!(doc["vm"], name);
        assert_eq!(doc["runs"], own, "{name}: the streamed pmap differs");
        let a = request(
            &p.socket(),
            "GET",
            &format!("/v1/vms/{name}/pmap?format=ndjson"),
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(Value::Array(ndjson(&a.body)), own, "{name}: ndjson differs");
        let frames: u64 = own
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["frames"].as_u64().unwrap())
            .sum();
        assert_eq!(
            frames,
            doc["frames"].as_u64().unwrap(),
            "{name}: every frame is mapped"
        );
    }
    let twin = p.monitor.lock().pmap("twin1").unwrap();
    assert!(twin.iter().any(|r| r.shared && r.protected), "{twin:?}");
    // The 1 GiB VM's pmap comes in pieces (chunked), not as one body.
    let (head, body) = raw_get(&p.socket(), "/v1/vms/big/pmap", Duration::from_secs(30));
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["frames"], 262144);

    // The memmap: per node, and every page in use with its owners.
    let summary = p.expect("GET", "/v1/memmap", None, 200);
    let (_, body) = raw_get(
        &p.socket(),
        "/v1/memmap?detail=true",
        Duration::from_secs(60),
    );
    let pages = ndjson(&body);
    let mut frames = [0u64; 4];
    let mut shared = [0u64; 4];
    for page in &pages {
        let owners = page["owners"].as_array().unwrap();
        assert_eq!(
            page["refcount"].as_u64().unwrap(),
            owners.len() as u64,
            "{page}"
        );
        let node = page["node"].as_u64().unwrap() as usize;
        frames[node] += owners.len() as u64;
        if owners.len() > 1 {
            shared[node] += 1;
            let names: Vec<&str> = owners.iter().map(|o| o["vm"].as_str().unwrap()).collect();
            assert!(names.iter().all(|n| n.starts_with("twin")), "{page}");
        }
    }
    for (n, node) in summary["nodes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(node["guest_frames"], frames[n], "node {n}: {node}");
        assert_eq!(
            node["sharing"]["shared_pages"], shared[n],
            "node {n}: {node}"
        );
    }
    assert!(shared.iter().sum::<u64>() >= 1000, "{shared:?}");
    let (_, body) = raw_get(
        &p.socket(),
        "/v1/memmap?node=1&from=100&count=50",
        Duration::from_secs(10),
    );
    let some = ndjson(&body);
    assert!(!some.is_empty() && some.len() <= 50);
    assert!(some
        .iter()
        .all(|pg| pg["node"] == 1 && (100..150).contains(&pg["page"].as_u64().unwrap())));
    let e = p.expect("GET", "/v1/memmap?node=7", None, 400);
    assert_eq!(e["field"], "node", "{e}");
    let e = p.expect("GET", "/v1/vms/big/pmap?format=xml", None, 400);
    assert_eq!(e["field"], "format", "{e}");

    p.expect("POST", "/v1/vms/big/stop", None, 200);
    let report = p.finish();
    assert!(report.verify_ok, "{:?}", report.verify_errors);
}

#[test]
fn page_sampling_goes_on_and_off_while_a_vm_runs() {
    if !require_kvm("page_sampling_goes_on_and_off_while_a_vm_runs") {
        return;
    }
    let s = Serve::start("sampling", "static");
    // Its memory two hops from its vCPU: migration has something to do.
    let vm = json!({"vcpus": 1, "node": 1, "memory_node": 3, "memory_mib": 8,
        "workload": {"kind": "sweep", "seed": 4, "passes": 10000}, "time_limit_s": 120});
    s.expect("PUT", "/v1/vms/walker", Some(vm), 201);
    let stats = s.expect("GET", "/v1/stats", None, 200);
    assert_eq!(stats["numa"], Value::Null, "static samples nothing");

    let on = s.expect(
        "PUT",
        "/v1/policy",
        Some(json!({"numa": {"migrate": true, "sampling": "page-faults"}})),
        200,
    );
    let status = on["status"].as_str().unwrap();
    assert!(status.contains("NUMA engine active"), "{status}");
    assert!(!status.contains("unavailable"), "{status}");
    let began = Instant::now();
    let walker = loop {
        let v = s.vm("walker");
        if v["local_percent"].is_number() && v["frames_migrated"].as_u64() > Some(0) {
            break v;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no samples or migrations of the running VM: {v}\n{}",
            s.expect("GET", "/v1/stats", None, 200)["numa"]
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(walker["state"], "running", "{walker}");
    let samples = s.expect("GET", "/v1/stats", None, 200)["numa"]["samples"]
        .as_u64()
        .unwrap();
    assert!(samples > 0);
    s.verified();

    // Off again: the NUMA runner stops; the guest goes on.
    let off = s.expect(
        "PUT",
        "/v1/policy",
        Some(json!({"numa": {"migrate": false, "replicate": false}})),
        200,
    );
    assert!(
        !off["status"]
            .as_str()
            .unwrap()
            .contains("NUMA engine active"),
        "{off}"
    );
    assert_eq!(s.expect("GET", "/v1/stats", None, 200)["numa"], Value::Null);
    let before = s.vm("walker")["progress"][0].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.vm("walker")["progress"][0].as_u64().unwrap() > before,
        "the guest stalled"
    );
    s.verified();
    s.expect("POST", "/v1/vms/walker/stop", None, 200);
    let v = s.wait_finished("walker", Duration::from_secs(30));
    assert_eq!(v["result"]["status"], "stopped", "{v}");
    let report = s.stop();
    assert_eq!(report["verify_ok"], true, "{}", report["verify_errors"]);
}

#[test]
fn disco_run_with_the_api_shows_a_finished_vm_while_another_runs() {
    if !require_kvm("disco_run_with_the_api_shows_a_finished_vm_while_another_runs") {
        return;
    }
    // In the run's own directory (`DiscoRun` makes it anew).
    let socket = std::env::temp_dir()
        .join(format!("disco-run-api-{}", std::process::id()))
        .join("api.sock");
    let mut run = common::DiscoRun::start(
        "run-api",
        common::SPIN_CONFIG,
        &["--json", "--api", socket.to_str().unwrap()],
    );
    let began = Instant::now();
    while !socket.exists() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "no API socket: {}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let get = |uri: &str| {
        let a = request(&socket, "GET", uri, None, Duration::from_secs(30)).unwrap();
        assert_eq!(a.status, 200, "{uri}: {}", a.body);
        a.json()
    };
    let quick = loop {
        let q = get("/v1/vms/quick");
        if q["state"] == "finished" && q["result"]["status"] != "exited" {
            break q;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "quick never showed its result: {q}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(quick["result"]["status"], "ok", "{quick}");
    assert!(checksums_verified(&quick), "{quick}");
    assert_eq!(get("/v1/vms/spinner")["state"], "running");
    let a = request(
        &socket,
        "POST",
        "/v1/vms/spinner/stop",
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    run.wait_exit();
    let report: Value = serde_json::from_str(&run.stdout()).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", run.stdout(), run.stderr());
    });
    assert_eq!(report["verify_ok"], true, "{}", report["verify_errors"]);
    assert_eq!(report["vms"][1]["name"], "quick");
    assert_eq!(report["vms"][1]["status"], "ok");
}

/// Snapshot, restore and clone through the API and `disco ctl`: a VM
/// snapshotted mid-run and stopped, restored under a new name and cloned
/// twice (once by `disco ctl`), every copy finishing with the model's
/// checksum; bad requests and a foreign file answered with the field at
/// fault.
#[test]
fn snapshot_restore_clone_over_the_api() {
    if !require_kvm("snapshot_restore_clone_over_the_api") {
        return;
    }
    let s = Serve::start("snapshot", "static");
    let file = s.dir.join("vm.snap");
    let body = json!({"vcpu_nodes": [0], "memory_mib": 16, "time_limit_s": 120,
        "workload": {"kind": "sweep", "seed": 21, "passes": 60}});
    s.expect("PUT", "/v1/vms/origin", Some(body), 201);
    let began = Instant::now();
    while s.vm("origin")["progress"][0] == 0 {
        assert!(began.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Bad requests first: each names its field.
    let e = s.expect(
        "POST",
        "/v1/vms/origin/snapshot",
        Some(json!({"path": "vm.snap"})),
        400,
    );
    assert_eq!(e["field"], "path", "{e}");
    let e = s.expect(
        "POST",
        "/v1/vms/origin/snapshot",
        Some(json!({"path": file, "then": "later"})),
        400,
    );
    assert_eq!(e["field"], "then", "{e}");
    let snap = s.expect(
        "POST",
        "/v1/vms/origin/snapshot",
        Some(json!({"path": file, "then": "stop"})),
        200,
    );
    assert!(snap["pages"].as_u64().unwrap() > 0, "{snap}");
    assert!(file.is_file());
    let origin = s.wait_finished("origin", Duration::from_secs(60));
    assert_eq!(origin["result"]["status"], "stopped", "{origin}");

    let restored = s.expect(
        "POST",
        "/v1/vms/restore",
        Some(json!({"path": file, "name": "again"})),
        201,
    );
    assert_eq!(restored["vm"]["name"], "again", "{restored}");
    let clones = s.expect(
        "POST",
        "/v1/vms/clone",
        Some(json!({"path": file, "count": 2, "prefix": "c", "nodes": [1, 2]})),
        201,
    );
    assert_eq!(clones["names"], json!(["c-0", "c-1"]), "{clones}");
    let out = Command::new(env!("CARGO_BIN_EXE_disco"))
        .arg("ctl")
        .arg(&s.socket)
        .arg("clone")
        .arg(&file)
        .arg("d0,d1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "disco ctl clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["again", "c-0", "c-1", "d0", "d1"] {
        let v = s.wait_finished(name, Duration::from_secs(120));
        assert!(checksums_verified(&v), "{name}: {v}");
    }
    assert_eq!(
        s.vm("c-1")["pages_per_node"][2],
        16 * 256,
        "clone c-1 on node 2"
    );

    // A file that is no snapshot: 422, the path named, nothing added.
    let foreign = s.dir.join("foreign.snap");
    std::fs::write(&foreign, b"just some text, not a snapshot\n").unwrap();
    let e = s.expect(
        "POST",
        "/v1/vms/restore",
        Some(json!({"path": foreign, "name": "never"})),
        422,
    );
    assert_eq!(e["field"], "path", "{e}");
    let message = e["error"].as_str().unwrap();
    assert!(
        message.contains("foreign.snap") && message.contains("not a disco snapshot"),
        "{message}"
    );
    s.expect("GET", "/v1/vms/never", None, 404);
    s.verified();
}
