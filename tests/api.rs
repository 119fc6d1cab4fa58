//! The REST API of a long-lived monitor: the built `disco serve` binary
//! with real micro-VMs, driven over its Unix socket by the library's HTTP
//! client. VMs added by PUT, paused, resumed, moved, finished with their
//! checksums verified, removed with `verify()` still holding; bad requests
//! answered with 4xx JSON errors naming the field; an oversize body 413;
//! an idle client and many concurrent ones block nobody.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disco::api::client::{request, Answer};
use disco::kvm_check::require_kvm;
use serde_json::{json, Value};

/// A `disco serve` process; killed (and its socket removed) when dropped.
struct Serve {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Serve {
    fn start(name: &str, policy: &str) -> Serve {
        let dir = std::env::temp_dir().join(format!("disco-api-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_disco"))
            .args(["serve", "--api"])
            .arg(&socket)
            .args(["--topology", "4-node", "--policy", policy, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("disco serve starts");
        let serve = Serve { child, socket, dir };
        let began = Instant::now();
        while !serve.socket.exists() {
            assert!(began.elapsed() < Duration::from_secs(20), "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    fn call(&self, method: &str, uri: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        request(
            &self.socket,
            method,
            uri,
            body.as_deref().map(str::as_bytes),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{method} {uri}: {e:#}"))
    }

    /// `call`, expecting `status`; returns the JSON body.
    fn expect(&self, method: &str, uri: &str, body: Option<Value>, status: u16) -> Value {
        let a = self.call(method, uri, body);
        assert_eq!(a.status, status, "{method} {uri}: {}", a.body);
        a.json()
    }

    fn vm(&self, name: &str) -> Value {
        self.expect("GET", &format!("/v1/vms/{name}"), None, 200)
    }

    /// Waits until VM `name` has finished; returns its info.
    fn wait_finished(&self, name: &str, limit: Duration) -> Value {
        let began = Instant::now();
        loop {
            let v = self.vm(name);
            // `exited` until its outcome is collected and checked.
            if v["state"] == "finished" && v["result"]["status"] != "exited" {
                return v;
            }
            assert!(began.elapsed() < limit, "{name} did not finish: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
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

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every vCPU of a finished VM returned the checksum the host model predicts.
fn checksums_verified(v: &Value) -> bool {
    let vcpus = v["result"]["vcpus"].as_array().unwrap();
    !vcpus.is_empty()
        && vcpus.iter().all(|c| {
            c["outcome"]["status"] == "done" && c["outcome"]["result"] == c["outcome"]["expected"]
        })
}

fn verify_holds(s: &Serve) -> Value {
    let stats = s.expect("GET", "/v1/stats?verify=true", None, 200);
    assert_eq!(stats["verify"]["ok"], true, "{}", stats["verify"]);
    stats
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
    verify_holds(&s);

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
    let before = used(&verify_holds(&s));
    let removed = s.expect("DELETE", "/v1/vms/third", None, 200);
    assert_eq!(removed["status"], "ok");
    let after = verify_holds(&s);
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
    verify_holds(&s);

    // A running VM removed mid-run.
    let spinner = json!({"memory_mib": 4, "time_limit_s": 120, "workload": {"kind": "spin"}});
    s.expect("PUT", "/v1/vms/spinner", Some(spinner), 201);
    std::thread::sleep(Duration::from_millis(200));
    let gone = s.expect("DELETE", "/v1/vms/spinner", None, 200);
    assert_eq!(gone["status"], "stopped", "{gone}");
    verify_holds(&s);

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
