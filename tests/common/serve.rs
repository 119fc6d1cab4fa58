//! A `disco serve` process (the built binary) driven over its API socket
//! by the library's HTTP client; killed, and its directory removed, when
//! dropped. Test files add the helpers only they need in their own `impl
//! Serve` blocks.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disco::api::client::{request, Answer};
use serde_json::Value;

pub struct Serve {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    /// The port it takes migrations on (`--migrate-listen`), if any.
    pub port: Option<u16>,
    /// How long one API call may take.
    pub call_limit: Duration,
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Serve {
    /// Starts `disco serve --api SOCKET ARGS...` in a fresh directory
    /// named after `prefix` and `name`, listening for migrations when
    /// `listen`; stdout (the report) is piped when `report`, else dropped.
    /// Returns once the socket (and the migration port) take connections.
    pub fn spawn(prefix: &str, name: &str, args: &[&str], listen: bool, report: bool) -> Serve {
        let dir =
            std::env::temp_dir().join(format!("disco-{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let port = listen.then(free_port);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_disco"));
        cmd.args(["serve", "--api"]).arg(&socket).args(args);
        if let Some(p) = port {
            cmd.arg("--migrate-listen").arg(format!("127.0.0.1:{p}"));
        }
        let (out, err) = if report {
            (Stdio::piped(), Stdio::piped())
        } else {
            (Stdio::null(), Stdio::null())
        };
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("disco serve starts");
        let serve = Serve {
            child,
            socket,
            dir,
            port,
            call_limit: Duration::from_secs(30),
        };
        let began = Instant::now();
        while !serve.socket.exists()
            || port.is_some_and(|p| TcpStream::connect(("127.0.0.1", p)).is_err())
        {
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "disco serve not up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    pub fn call(&self, method: &str, uri: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string());
        request(
            &self.socket,
            method,
            uri,
            body.as_deref().map(str::as_bytes),
            self.call_limit,
        )
        .unwrap_or_else(|e| panic!("{method} {uri}: {e:#}"))
    }

    /// `call`, expecting `status`; returns the JSON body.
    pub fn expect(&self, method: &str, uri: &str, body: Option<Value>, status: u16) -> Value {
        let a = self.call(method, uri, body);
        assert_eq!(a.status, status, "{method} {uri}: {}", a.body);
        a.json()
    }

    pub fn vm(&self, name: &str) -> Value {
        self.expect("GET", &format!("/v1/vms/{name}"), None, 200)
    }

    /// Waits until VM `name` has finished (and its outcome is checked:
    /// `exited` until then); returns its info.
    pub fn wait_finished(&self, name: &str, limit: Duration) -> Value {
        let began = Instant::now();
        loop {
            let v = self.vm(name);
            // A VM whose vCPUs are all done (a restore of a snapshot taken
            // after its guest finished never starts one) can read
            // "finished" while its result is still "running" or "exited",
            // before the monitor collects it.
            let status = &v["result"]["status"];
            if v["state"] == "finished" && status != "exited" && status != "running" {
                return v;
            }
            assert!(began.elapsed() < limit, "{name} did not finish: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `verify()` holds; returns the stats.
    pub fn verified(&self) -> Value {
        let stats = self.expect("GET", "/v1/stats?verify=true", None, 200);
        assert_eq!(stats["verify"]["ok"], true, "{}", stats["verify"]);
        stats
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
pub fn checksums_verified(v: &Value) -> bool {
    let vcpus = v["result"]["vcpus"].as_array().unwrap();
    !vcpus.is_empty()
        && vcpus.iter().all(|c| {
            c["outcome"]["status"] == "done" && c["outcome"]["result"] == c["outcome"]["expected"]
        })
}
