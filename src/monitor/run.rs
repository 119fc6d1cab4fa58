//! `disco run`: a monitor driven through one config's VMs. Builds them all,
//! starts them together, shows a progress line, answers the control socket
//! and the API while they run, and reports once all have ended.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

use super::Monitor;
use crate::config::Config;
use crate::control::{Command, ControlSocket};
use crate::report::RunReport;

/// How `run` behaves; the defaults suit the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Draw a live progress line on stderr.
    pub progress: bool,
    /// How often to run `Memory::verify` while guests run.
    pub verify_every: Duration,
    /// Longest wait for the sharing scanner's final passes once the guests
    /// are done; `None`: [`super::settle_limit`] of the guests' memory.
    pub settle_limit: Option<Duration>,
    /// `disco serve`: take live migrations on this TCP address
    /// (`crate::migration::Listener`).
    pub migrate_listen: Option<String>,
    /// `disco serve`: guest RAM may ask for large shmem folios
    /// (`crate::memory::folios`; `disco run` takes `[host] large_folios`
    /// from its config instead).
    pub large_folios: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: true,
            verify_every: Duration::from_millis(500),
            settle_limit: None,
            migrate_listen: None,
            large_folios: true,
        }
    }
}

impl RunOptions {
    /// The defaults without the progress line (benchmarks, tests).
    pub fn quiet() -> RunOptions {
        RunOptions {
            progress: false,
            ..RunOptions::default()
        }
    }
}

/// Runs every VM of `config` to completion and reports.
pub fn run(config: &Config, options: &RunOptions) -> Result<RunReport> {
    run_with(config, options, None, None)
}

/// [`run`], answering the commands of a control socket (`disco run
/// --control PATH`, see [`crate::control`]) while the guests run.
pub fn run_with_control(
    config: &Config,
    options: &RunOptions,
    control: Option<&ControlSocket>,
) -> Result<RunReport> {
    run_with(config, options, control, None)
}

/// [`run_with_control`], with the REST API (`crate::api`) open at `api`
/// while the guests run.
pub fn run_with(
    config: &Config,
    options: &RunOptions,
    control: Option<&ControlSocket>,
    api: Option<&Path>,
) -> Result<RunReport> {
    let started = Instant::now();
    let mut monitor = Monitor::for_config(config, options.verify_every)?;
    // One raise of vm.max_map_count (as root) for all VMs, not one per VM.
    monitor.reserve_for(&config.vms)?;
    for vc in &config.vms {
        match crate::signals::interrupted() {
            Some(signal) => {
                monitor.record_not_created(vc, format!("not created: {signal} interrupted the run"))
            }
            // Overcommitted: each VM is built once its memory fits.
            None if config.overcommit => monitor.queue_vm(vc),
            None => {
                // A VM that cannot be built is reported failed; the others run.
                let _ = monitor.create_vm(vc);
            }
        }
    }
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    monitor.check("before start");
    monitor.start_fault_handler()?;
    monitor.start_created();
    monitor.start_services(config.vms.len())?;

    let bar = if options.progress {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}",
            )
            .unwrap(),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    // With the API open, a VM that finished shows as finished with its
    // result (checksums checked against the host model, on a thread of its
    // own) while the others still run; without it nobody looks before the
    // end, so the host model's work waits until the guests are done.
    monitor.collect_finished(api.is_some());
    let monitor = Arc::new(Mutex::new(monitor));
    let server = match api {
        Some(path) => Some(crate::api::Server::start(path, monitor.clone())?),
        None => None,
    };
    loop {
        let mut m = monitor.lock();
        if let Some(signal) = crate::signals::interrupted() {
            m.interrupt(signal);
            break;
        }
        m.tick();
        if let Some(control) = control {
            for request in control.pending() {
                let answer = match &request.command {
                    Command::Status => Ok(m.status_line()),
                    Command::Move { vm, node, vcpu } => m
                        .move_vcpus(vm, *node, *vcpu, "control socket")
                        .map_err(|e| e.to_string()),
                };
                request.answer(answer);
            }
        }
        let (done, total, finished, count) = m.progress();
        bar.set_length(total.max(1));
        bar.set_position(done);
        let shared = match m.services.scanner {
            Some(_) => format!(
                ", {:.1} MiB saved by sharing",
                m.memory.sharing_stats().saved_bytes as f64 / (1024.0 * 1024.0)
            ),
            None => String::new(),
        };
        let waiting = match m.waiting() {
            0 => String::new(),
            n => format!(", {n} waiting for memory"),
        };
        bar.set_message(format!("{finished}/{count} VMs finished{waiting}{shared}"));
        if m.all_finished() {
            break;
        }
        m.sample_memory();
        m.verify_if_due();
        drop(m);
        std::thread::sleep(Duration::from_millis(10));
    }
    // From here on nothing answers the control socket's commands: tell
    // its clients at once rather than let them wait for a loop that is gone.
    if let Some(control) = control {
        control.close();
    }
    drop(server);
    let monitor = Arc::into_inner(monitor)
        .expect("the API server has stopped")
        .into_inner();
    monitor.finish(options.settle_limit, &bar, create_ms)
}

/// `disco serve`: a monitor with no VM on `topology` under `policy`, its
/// API open at `api`, taking VMs in and out until SIGINT or SIGTERM; then
/// every VM still there is stopped and reported.
pub fn serve(
    topology: crate::topology::Topology,
    policy: crate::config::Policy,
    api: &Path,
    options: &RunOptions,
) -> Result<RunReport> {
    serve_until(topology, policy, api, options, crate::signals::interrupted)
}

/// [`serve`] until `stop` names a reason (a signal's name for `disco
/// serve`; the API benchmark stops its own monitor this way).
pub fn serve_until(
    topology: crate::topology::Topology,
    policy: crate::config::Policy,
    api: &Path,
    options: &RunOptions,
    stop: impl Fn() -> Option<&'static str>,
) -> Result<RunReport> {
    let mut monitor = Monitor::new(topology, policy, "<api>", options.verify_every)?;
    monitor.memory().set_large_folios(options.large_folios);
    // VMs come and go: each one's result as soon as it is done.
    monitor.collect_finished(true);
    monitor.check("before start");
    monitor.start_services(0)?;
    let monitor = Arc::new(Mutex::new(monitor));
    let server = crate::api::Server::start(api, monitor.clone())?;
    let listener = match &options.migrate_listen {
        Some(addr) => Some(crate::migration::Listener::start(addr, monitor.clone())?),
        None => None,
    };
    loop {
        let mut m = monitor.lock();
        if let Some(why) = stop() {
            m.interrupt(why);
            break;
        }
        m.tick();
        m.sample_memory();
        if m.any_running() {
            m.verify_if_due();
        }
        drop(m);
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(listener);
    drop(server);
    let monitor = Arc::into_inner(monitor)
        .expect("the API server has stopped")
        .into_inner();
    monitor.finish(options.settle_limit, &ProgressBar::hidden(), 0.0)
}
