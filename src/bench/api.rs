//! The API scenario (`disco bench api`): what the REST API costs an
//! operator with many VMs running, and how fast VMs come up through it.
//!
//! One run (one seed):
//!
//! 1. **Through the API.** A monitor as `disco serve` runs one
//!    ([`monitor::serve_until`], on a socket in a directory of its own) takes
//!    `vms` micro-VMs by `PUT /v1/vms/{name}`, one after the other, each
//!    built and started before the answer: VMs created and started per
//!    second, and each PUT's latency against the VMs already running. With
//!    all of them running (`spin`: a guest that runs until stopped), the
//!    latency of `requests` calls each of `GET /v1/vms` and `GET
//!    /v1/vms/{name}`, and of `put_requests` `PUT`s of one more VM (each
//!    removed again by `DELETE`, also timed). Requests go one at a time over
//!    one kept-open connection (`api::client::Connection`), as a polling
//!    client sends them; connecting is not in the figures.
//! 2. **By `disco run`.** The same VMs in one config, run by
//!    [`monitor::run_with`] (its API open, so the bench can see them all
//!    running and then stop them): the run report's `started_ms`, from the
//!    monitor ready to every VM built and started.
//!
//! Both monitors are real (KVM VMs, guest code, the policy's service
//! threads); the first is stopped as a signal would stop `disco serve`,
//! and both must end with `verify()` holding and every VM stopped, none
//! failed. The anchor: Firecracker reports up to 150 microVMs started per
//! second per host (its own figure, on hardware-virtualisation hosts).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::params::{ParamResult, Params};
use super::suite::{Better, Figure, Plot, Progress, Scenario, ScenarioResult};
use super::svg::LinePlot;
use super::{config_from_toml, markdown_table, HostInfo, Stats};
use crate::api::client::{Answer, Connection};
use crate::config::Config;
use crate::monitor::{self, RunOptions};
use crate::report::{RunReport, VmReport};

/// Firecracker's published start rate per host (microVMs per second).
pub const FIRECRACKER_VMS_PER_S: f64 = 150.0;

/// The longest any one request may take before the run is an error.
const REQUEST_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct ApiScenario {
    vms: usize,
    memory_mib: u64,
    requests: usize,
    put_requests: usize,
    policy: String,
    topology: String,
}

impl ApiScenario {
    /// The VMs' config; `disco run` reads it whole, the API side sends
    /// each `[[vm]]` table as a PUT body.
    fn config_text(&self) -> String {
        let mut text = format!(
            "policy = \"{}\"\n[host]\ntopology = \"{}\"\n",
            self.policy, self.topology
        );
        for i in 0..self.vms {
            text += &format!("\n[[vm]]\nname = \"vm{i}\"\n{}", self.vm_keys());
        }
        text
    }

    /// One VM's keys (its name apart).
    fn vm_keys(&self) -> String {
        format!(
            "vcpus = 1\nmemory_mib = {}\ntime_limit_s = 3600\nworkload = {{ kind = \"spin\" }}\n",
            self.memory_mib
        )
    }

    /// One VM's PUT body: its keys as JSON.
    fn vm_body(&self) -> Result<Vec<u8>> {
        let table: toml::Table = self.vm_keys().parse()?;
        Ok(serde_json::to_vec(&table)?)
    }
}

/// Latency percentiles of one kind of request, ms.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub request: String,
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

impl Latency {
    fn of(request: &str, samples_ms: Vec<f64>) -> Latency {
        Latency {
            request: request.to_string(),
            n: samples_ms.len(),
            p50_ms: percentile(&samples_ms, 0.50),
            p99_ms: percentile(&samples_ms, 0.99),
            max_ms: percentile(&samples_ms, 1.0),
            samples_ms,
        }
    }
}

/// The nearest-rank `q` quantile of `samples` (0 when there are none).
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Clone, Debug, Serialize)]
pub struct ApiResult {
    pub host: HostInfo,
    pub vms: usize,
    pub memory_mib: u64,
    pub policy: String,
    pub topology: String,
    /// Through the API: every VM's PUT, from the first sent to the last
    /// answered, and VMs per second over it.
    pub api_create_start_ms: f64,
    pub api_vms_per_s: f64,
    /// Each VM's PUT latency, in order (VM i found i VMs running).
    pub put_ms_by_running: Vec<f64>,
    /// With every VM running.
    pub latencies: Vec<Latency>,
    /// `disco run` of the same VMs: from its monitor ready to every VM
    /// started, and VMs per second over it.
    pub run_create_start_ms: f64,
    pub run_vms_per_s: f64,
    /// The API side's monitor process: threads and kernel mappings with
    /// every VM running (context for the latencies).
    pub threads_at_full: usize,
    pub kernel_mappings_at_full: usize,
}

impl ApiResult {
    fn latency(&self, request: &str) -> Option<&Latency> {
        self.latencies.iter().find(|l| l.request == request)
    }
}

/// A directory of its own for a monitor's socket, removed when dropped.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new(what: &str) -> Result<SocketDir> {
        let dir = std::env::temp_dir().join(format!(
            "disco-bench-api-{what}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
        Ok(SocketDir(dir))
    }
    fn socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects once the monitor's socket exists (its start-up made the pools).
fn connect(
    socket: &Path,
    monitor: &std::thread::JoinHandle<Result<RunReport>>,
) -> Result<Connection> {
    let began = Instant::now();
    loop {
        if socket.exists() {
            if let Ok(c) = Connection::open(socket) {
                return Ok(c);
            }
        }
        ensure!(
            !monitor.is_finished(),
            "the monitor ended before its API socket answered"
        );
        ensure!(
            began.elapsed() < REQUEST_LIMIT,
            "no API socket at {} after {REQUEST_LIMIT:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one request, expecting `status`; returns the answer and its time, ms.
fn timed(
    c: &mut Connection,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
    status: u16,
) -> Result<(Answer, f64)> {
    let t = Instant::now();
    let a = c.call(method, uri, body, REQUEST_LIMIT)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        a.status == status,
        "{method} {uri}: HTTP {} (expected {status}): {}",
        a.status,
        a.body
    );
    Ok((a, ms))
}

/// How many VMs `GET /v1/vms` shows in state `running`.
fn running(c: &mut Connection) -> Result<usize> {
    let (a, _) = timed(c, "GET", "/v1/vms", None, 200)?;
    Ok(a.json()["vms"]
        .as_array()
        .map_or(0, |v| v.iter().filter(|v| v["state"] == "running").count()))
}

/// Every VM of the report stopped by the bench (none failed) and the
/// memory invariants held throughout.
fn check_report(side: &str, report: &RunReport, vms: usize) -> Result<()> {
    ensure!(
        report.verify_ok,
        "{side}: memory invariants: {}",
        report.verify_errors.join("; ")
    );
    let bad: Vec<String> = report
        .vms
        .iter()
        .filter(|v| !matches!(v.status.as_str(), "stopped" | "interrupted"))
        .map(VmReport::status_line)
        .collect();
    ensure!(
        bad.is_empty(),
        "{side}: VMs not stopped as asked: {}",
        bad.join("; ")
    );
    ensure!(
        report.vms.len() == vms,
        "{side}: {} VMs in the report, {vms} expected",
        report.vms.len()
    );
    Ok(())
}

fn threads_of_process() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Both monitors' options: `verify()` before and after, and while the
/// guests run only every [`VERIFY_EVERY`]: with 100 VMs a check reads
/// thousands of mappings under the monitor's lock, and at the default
/// (every 500 ms) the figures would be the checks' more than the API's.
fn bench_run_options() -> RunOptions {
    RunOptions {
        progress: false,
        verify_every: VERIFY_EVERY,
        ..RunOptions::default()
    }
}

/// How often both monitors check the memory invariants while VMs run.
const VERIFY_EVERY: Duration = Duration::from_secs(30);

/// The API side: a served monitor taking the VMs one PUT at a time.
fn through_api(s: &ApiScenario, config: &Config, progress: &Progress) -> Result<ApiResult> {
    let dir = SocketDir::new("serve")?;
    let socket = dir.socket();
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (topology, policy) = (config.topology()?, config.policy.clone());
        let (socket, stop) = (socket.clone(), stop.clone());
        std::thread::Builder::new()
            .name("disco-bench-serve".into())
            .spawn(move || {
                let options = bench_run_options();
                monitor::serve_until(topology, policy, &socket, &options, || {
                    stop.load(Ordering::Relaxed).then_some("the benchmark")
                })
            })?
    };
    let measured = (|| -> Result<ApiResult> {
        let mut c = connect(&socket, &monitor)?;
        let body = s.vm_body()?;
        progress.say(&format!("through the API: PUT {} VMs", s.vms));
        let bar = progress.bar(s.vms as u64);
        let mut put_ms = Vec::with_capacity(s.vms);
        let t0 = Instant::now();
        for i in 0..s.vms {
            let (_, ms) = timed(&mut c, "PUT", &format!("/v1/vms/vm{i}"), Some(&body), 201)?;
            put_ms.push(ms);
            bar.inc(1);
        }
        let create_start = t0.elapsed();
        bar.finish_and_clear();
        let up = running(&mut c)?;
        ensure!(up == s.vms, "{up} of {} VMs running after every PUT", s.vms);
        let threads_at_full = threads_of_process();
        let kernel_mappings_at_full =
            std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());

        progress.say(&format!(
            "latencies with {} VMs running: {} GETs each, {} PUT + DELETE",
            s.vms, s.requests, s.put_requests
        ));
        let mut list = Vec::with_capacity(s.requests);
        let mut show = Vec::with_capacity(s.requests);
        for k in 0..s.requests {
            list.push(timed(&mut c, "GET", "/v1/vms", None, 200)?.1);
            let name = format!("vm{}", k % s.vms);
            show.push(timed(&mut c, "GET", &format!("/v1/vms/{name}"), None, 200)?.1);
        }
        let (mut put, mut delete) = (Vec::new(), Vec::new());
        for k in 0..s.put_requests {
            let uri = format!("/v1/vms/extra{k}");
            put.push(timed(&mut c, "PUT", &uri, Some(&body), 201)?.1);
            delete.push(timed(&mut c, "DELETE", &uri, None, 200)?.1);
        }
        let up = running(&mut c)?;
        ensure!(
            up == s.vms,
            "{up} of {} VMs still running after the latencies",
            s.vms
        );
        Ok(ApiResult {
            host: HostInfo::detect(),
            vms: s.vms,
            memory_mib: s.memory_mib,
            policy: s.policy.clone(),
            topology: s.topology.clone(),
            api_create_start_ms: create_start.as_secs_f64() * 1e3,
            api_vms_per_s: s.vms as f64 / create_start.as_secs_f64(),
            put_ms_by_running: put_ms,
            latencies: vec![
                Latency::of("GET /v1/vms", list),
                Latency::of("GET /v1/vms/{name}", show),
                Latency::of("PUT /v1/vms/{name}", put),
                Latency::of("DELETE /v1/vms/{name}", delete),
            ],
            run_create_start_ms: 0.0,
            run_vms_per_s: 0.0,
            threads_at_full,
            kernel_mappings_at_full,
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let report = monitor
        .join()
        .map_err(|_| anyhow::anyhow!("the served monitor panicked"))??;
    let result = measured?;
    check_report("through the API", &report, s.vms)?;
    Ok(result)
}

/// The `disco run` side: the same VMs in one config; once all run, the
/// bench stops them through the run's API.
fn by_disco_run(s: &ApiScenario, config: &Config, progress: &Progress) -> Result<RunReport> {
    progress.say(&format!("disco run of the same {} VMs", s.vms));
    let dir = SocketDir::new("run")?;
    let socket = dir.socket();
    let run = {
        let (config, socket) = (config.clone(), socket.clone());
        std::thread::Builder::new()
            .name("disco-bench-run".into())
            .spawn(move || {
                let options = bench_run_options();
                monitor::run_with(&config, &options, None, Some(&socket))
            })?
    };
    let stopped = (|| -> Result<()> {
        let mut c = connect(&socket, &run)?;
        let began = Instant::now();
        while running(&mut c)? < s.vms {
            ensure!(
                began.elapsed() < REQUEST_LIMIT,
                "the run's VMs did not all run within {REQUEST_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for i in 0..s.vms {
            timed(&mut c, "POST", &format!("/v1/vms/vm{i}/stop"), None, 200)?;
        }
        Ok(())
    })();
    let report = run
        .join()
        .map_err(|_| anyhow::anyhow!("the run panicked"))??;
    stopped?;
    check_report("disco run", &report, s.vms)?;
    if report.started_ms <= 0.0 {
        bail!("the run report has no start time");
    }
    Ok(report)
}

/// Reads a `kind = "api"` scenario file: `vms`, `memory_mib`, `requests`,
/// `put_requests`, `policy`, `topology`.
pub fn prepare(p: &Params) -> ParamResult<Box<dyn Scenario>> {
    let quick = p.quick();
    let s = ApiScenario {
        vms: p.usize(
            "vms",
            1,
            crate::config::MAX_COUNT as usize,
            if quick { 20 } else { 100 },
        )?,
        memory_mib: p.u64("memory_mib", 2, 1024, 4)?,
        requests: p.usize("requests", 1, 100_000, if quick { 50 } else { 200 })?,
        put_requests: p.usize("put_requests", 1, 10_000, if quick { 5 } else { 20 })?,
        policy: p.policy("policy", "disco")?,
        topology: p.topology("topology", "host")?,
    };
    config_from_toml(&s.config_text())
        .map_err(|e| super::blame_config_error(p, &e, &s.policy, "policy", "vms"))?;
    Ok(Box::new(s))
}

impl Scenario for ApiScenario {
    fn run(&self, _seed: u64, progress: &Progress) -> Result<Box<dyn ScenarioResult>> {
        let config = config_from_toml(&self.config_text())?;
        let mut result = through_api(self, &config, progress).context("through the API")?;
        let report = by_disco_run(self, &config, progress).context("disco run")?;
        result.run_create_start_ms = report.started_ms;
        result.run_vms_per_s = self.vms as f64 / (report.started_ms / 1e3);
        Ok(Box::new(result))
    }

    fn policies(&self) -> Vec<String> {
        vec![self.policy.clone()]
    }
}

impl ScenarioResult for ApiResult {
    fn figures(&self) -> Vec<Figure> {
        let mut out = vec![
            Figure::value(
                "VMs created and started per second through the API",
                "VMs/s",
                Better::Higher,
                self.api_vms_per_s,
            )
            .headline(),
            Figure::value(
                "VMs created and started per second by disco run",
                "VMs/s",
                Better::Higher,
                self.run_vms_per_s,
            ),
            Figure::value(
                "API / disco run start rate",
                "ratio",
                Better::Higher,
                self.api_vms_per_s / self.run_vms_per_s.max(1e-9),
            ),
            Figure::value(
                "start rate / Firecracker's 150 per s",
                "ratio",
                Better::Higher,
                self.api_vms_per_s / FIRECRACKER_VMS_PER_S,
            ),
            Figure::new(
                "PUT latency while the VMs were added",
                "ms",
                Better::Lower,
                Stats::of(&self.put_ms_by_running),
            ),
        ];
        for l in &self.latencies {
            let headline = l.request == "GET /v1/vms" || l.request == "PUT /v1/vms/{name}";
            for (what, v) in [("p50", l.p50_ms), ("p99", l.p99_ms)] {
                let f = Figure::value(
                    &format!("{} {what} ({} VMs running)", l.request, self.vms),
                    "ms",
                    Better::Lower,
                    v,
                );
                out.push(if headline { f.headline() } else { f });
            }
        }
        out
    }

    fn plots(&self) -> Vec<Plot> {
        let per_vm_run = self.run_create_start_ms / self.vms.max(1) as f64;
        let plot = LinePlot::new(
            &format!(
                "PUT /v1/vms/{{name}} latency as {} micro-VMs are added ({} MiB, {})",
                self.vms, self.memory_mib, self.policy
            ),
            "VMs already running",
            "ms (build + start one VM)",
        )
        .series(
            "PUT latency",
            self.put_ms_by_running
                .iter()
                .enumerate()
                .map(|(i, &ms)| (i as f64, ms))
                .collect(),
        )
        .reference_line(
            per_vm_run,
            "disco run: ms per VM (all built, then all started)",
        )
        .reference_line(
            1e3 / FIRECRACKER_VMS_PER_S,
            "Firecracker: 150 VMs/s per host",
        );
        vec![Plot {
            name: "put-latency".into(),
            title: "PUT latency as VMs are added".into(),
            svg: plot.render(),
        }]
    }

    fn markdown(&self) -> String {
        let mut out = format!(
            "{} micro-VMs of {} MiB (`spin`, 1 vCPU), policy `{}`, topology `{}`; {}\n\n",
            self.vms,
            self.memory_mib,
            self.policy,
            self.topology,
            self.host.describe()
        );
        out += &markdown_table(
            &["start", "all VMs built and started, ms", "VMs/s"],
            &[
                vec![
                    "through the API (one PUT at a time)".into(),
                    format!("{:.0}", self.api_create_start_ms),
                    format!("{:.1}", self.api_vms_per_s),
                ],
                vec![
                    "disco run (one config)".into(),
                    format!("{:.0}", self.run_create_start_ms),
                    format!("{:.1}", self.run_vms_per_s),
                ],
                vec![
                    "Firecracker (its published figure)".into(),
                    "-".into(),
                    format!("{FIRECRACKER_VMS_PER_S:.0}"),
                ],
            ],
        );
        out += &format!(
            "\nWith {} VMs running ({} threads, {} kernel mappings in the monitor), one request at a time on one connection:\n\n",
            self.vms, self.threads_at_full, self.kernel_mappings_at_full
        );
        let rows: Vec<Vec<String>> = self
            .latencies
            .iter()
            .map(|l| {
                vec![
                    format!("`{}`", l.request),
                    l.n.to_string(),
                    format!("{:.2}", l.p50_ms),
                    format!("{:.2}", l.p99_ms),
                    format!("{:.2}", l.max_ms),
                ]
            })
            .collect();
        out += &markdown_table(&["request", "n", "p50 ms", "p99 ms", "max ms"], &rows);
        if let Some(get) = self.latency("GET /v1/vms") {
            out += &format!(
                "\n`GET /v1/vms` answers with every VM's info ({} VMs) in {:.2} ms at the median.\n",
                self.vms, get.p50_ms
            );
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_put_body_is_the_config_vm_table() {
        let s = ApiScenario {
            vms: 2,
            memory_mib: 4,
            requests: 1,
            put_requests: 1,
            policy: "static".into(),
            topology: "host".into(),
        };
        let body: serde_json::Value = serde_json::from_slice(&s.vm_body().unwrap()).unwrap();
        assert_eq!(body["memory_mib"], 4);
        assert_eq!(body["workload"]["kind"], "spin");
        let config = config_from_toml(&s.config_text()).unwrap();
        assert_eq!(config.vms.len(), 2);
        assert_eq!(config.vms[1].memory_mib, 4);
    }
}
