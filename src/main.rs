//! The `disco` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use disco::bench::compare;
use disco::bench::suite::{self, Progress, ScenarioFile};
use disco::config::Config;
use disco::monitor::{self, RunOptions};
use disco::topology::Topology;

#[derive(Parser)]
#[command(
    name = "disco",
    version,
    about = "A NUMA-aware, Disco-style virtual machine monitor on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the VMs of a config (without CONFIG: the embedded demo scenario).
    Run {
        /// A TOML config file; see configs/ and README.md.
        config: Option<PathBuf>,
        /// Print the report as JSON on stdout instead of text.
        #[arg(long)]
        json: bool,
        /// No live progress line.
        #[arg(long)]
        quiet: bool,
        /// Listen for commands on this Unix socket while the guests run
        /// (`disco ctl PATH status`, `disco ctl PATH move VM NODE [VCPU]`).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Serve the REST API on this Unix socket while the guests run
        /// (`curl --unix-socket PATH http://localhost/v1/vms`).
        #[arg(long, value_name = "PATH")]
        api: Option<PathBuf>,
    },
    /// Start a monitor with no VM and serve its REST API on a Unix socket:
    /// VMs are added, paused, moved and removed through it (see
    /// docs/api/openapi.yaml). SIGINT or SIGTERM stops it with a report.
    Serve {
        /// The Unix socket of the API.
        #[arg(long, value_name = "PATH")]
        api: PathBuf,
        /// "host", a shipped fixture (1-node, 2-socket, 4-node, 8-node) or
        /// an hwloc XML file.
        #[arg(long, default_value = "host")]
        topology: String,
        /// A shipped policy (disco, static, migrate-only, replicate-only)
        /// or a policy file (.toml).
        #[arg(long, default_value = "disco")]
        policy: String,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
        /// Take live migrations from other monitors on this TCP address
        /// (HOST:PORT; `disco ctl SOCKET migrate VM HOST:PORT` sends one).
        #[arg(long, value_name = "ADDR")]
        migrate_listen: Option<String>,
        /// Guest RAM asks for large shmem folios where the host allows a
        /// size; `false` keeps 4 KiB folios (README, "Large folios").
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        large_folios: bool,
    },
    /// Send one command to a running monitor's API (`disco serve --api PATH`,
    /// `disco run --api PATH`) and print the answer: status, show VM, add VM
    /// FILE.json, pause / resume / stop / delete VM, move VM NODE [VCPU], pmap
    /// VM, memmap, stats, policy [FILE.json], snapshot VM FILE [resume|stop],
    /// restore FILE NAME [MEMORY_NODE], clone FILE COUNT|NAMES [NODES], migrate VM[,VM..] HOST:PORT. Against the control socket of
    /// `disco run --control PATH`: `status` or `move VM NODE [VCPU]`.
    Ctl {
        /// The control socket of the run.
        socket: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Show a running monitor live in the terminal (its API at PATH):
    /// per VM state, vCPU nodes, memory per node, shared MiB, copy-on-write
    /// breaks/s; per node pool use; refreshed every second; `q` quits.
    Top {
        /// The Unix socket of the API (`disco serve --api PATH`).
        #[arg(long, value_name = "PATH")]
        api: PathBuf,
    },
    /// Validate a config file and summarise it, without running anything.
    Check { config: PathBuf },
    /// Print a NUMA topology: the host's, or a fixture's and how it maps onto the host.
    Topo {
        /// A shipped fixture name (1-node, 2-socket, 4-node, 8-node) or an hwloc XML file.
        #[arg(long)]
        fixture: Option<String>,
    },
    /// Print the embedded default config (a starting point for your own).
    DefaultConfig,
    /// Benchmarks on real KVM: the suite (`all`), one scenario by name, scenario
    /// files (`run`), `compare` of two results folders, `list`.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// How a suite run is run and where it writes.
#[derive(clap::Args, Clone, Debug)]
struct SuiteArgs {
    /// The quick variant of every scenario (its `[quick]` table): a look,
    /// not figures to publish.
    #[arg(long)]
    quick: bool,
    /// Results folder (default: bench-results/<UTC date>-<commit>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Scenario directory to use instead of the shipped scenarios
    /// (every *.toml in it).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Override a scenario key, e.g. --set vms=4 (repeatable; applies to
    /// every scenario run).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print each scenario's JSON record on stdout when done.
    #[arg(long)]
    json: bool,
    /// No progress bars or phase lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Run every scenario (shipped, or every *.toml of --dir).
    All(SuiteArgs),
    /// Run scenario files.
    Run {
        #[arg(required = true, value_name = "FILE.toml")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        args: SuiteArgs,
    },
    /// Compare two results folders: what got better or worse beyond noise.
    Compare {
        old: PathBuf,
        new: PathBuf,
        /// Smallest relative change of a median that counts, percent.
        #[arg(long, default_value_t = 5.0)]
        threshold: f64,
        /// Exit with status 1 when a figure got worse.
        #[arg(long)]
        fail_on_regression: bool,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the scenarios (shipped, or of --dir) and the scenario kinds.
    List {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run one scenario by name (e.g. `disco bench sharing --quick`).
    #[command(external_subcommand)]
    Scenario(Vec<String>),
}

/// `disco bench NAME [options]`.
#[derive(Parser)]
#[command(name = "disco bench")]
struct ScenarioCli {
    name: String,
    #[command(flatten)]
    args: SuiteArgs,
}

/// Whether stdout's reader went away (see [`out`]).
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to stdout. When the reader has gone away (EPIPE, as in
/// `disco check X | head -1`) the rest of the output is dropped quietly and
/// the command ends as it would have, like other command-line tools; any
/// other write error (`disco run > /dev/full`) is an error naming stdout.
/// (`print!` would panic in both cases.)
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
    }
}

/// `println!` through [`out`].
macro_rules! outln {
    ($($arg:tt)*) => {
        out(&format!("{}\n", format_args!($($arg)*)))
    };
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISCO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    // Any start puts back what a disco killed before it could left changed.
    for note in disco::leftovers::restore_at_start() {
        eprintln!("{note}");
    }
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("disco: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded_default(),
    })
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            json,
            quiet,
            control,
            api,
        } => {
            // Before any thread exists: threads inherit the blocked signals.
            disco::signals::install()?;
            let config = load_config(&config)?;
            let options = RunOptions {
                progress: !quiet && !json,
                ..RunOptions::default()
            };
            let control = control
                .as_deref()
                .map(disco::control::ControlSocket::bind)
                .transpose()?;
            disco::signals::remove_on_exit(control.as_ref().map(|c| c.path().to_path_buf()));
            if let Some(c) = &control {
                eprintln!(
                    "disco run: control socket {} (disco ctl {} status)",
                    c.path().display(),
                    c.path().display()
                );
            }
            disco::signals::remove_on_exit(api.clone());
            if let Some(p) = &api {
                eprintln!(
                    "disco run: API on {} (curl --unix-socket {} http://localhost/v1/vms)",
                    p.display(),
                    p.display()
                );
            }
            let report = monitor::run_with(&config, &options, control.as_ref(), api.as_deref())?;
            report_and_exit(&report, json)
        }
        Command::Serve {
            api,
            topology,
            policy,
            json,
            migrate_listen,
            large_folios,
        } => {
            disco::signals::install()?;
            let topology = match topology.as_str() {
                "host" => Topology::host()?,
                name if Topology::fixture_names().contains(&name) => {
                    Topology::from_fixture_name(name)?
                }
                path if path.ends_with(".xml") => Topology::from_xml_file(std::path::Path::new(path))?,
                other => anyhow::bail!(
                    "--topology `{other}`: allowed: host, a shipped fixture ({}), or an hwloc XML file ending in .xml",
                    Topology::fixture_names().join(", ")
                ),
            };
            let policy = disco::config::load_policy_at(
                &policy,
                std::path::Path::new("."),
                disco::config::At::new("--policy", ""),
                "",
            )?;
            disco::signals::remove_on_exit(Some(api.clone()));
            eprintln!(
                "disco serve: API on {} (curl --unix-socket {} http://localhost/v1/vms); \
                 Ctrl-C stops it",
                api.display(),
                api.display()
            );
            if let Some(addr) = &migrate_listen {
                eprintln!("disco serve: taking live migrations on {addr}");
            }
            let options = RunOptions {
                progress: false,
                migrate_listen,
                large_folios,
                ..RunOptions::default()
            };
            let report = monitor::serve(topology, policy, &api, &options)?;
            report_and_exit(&report, json)
        }
        Command::Ctl { socket, command } => {
            if disco::api::ctl::speaks_api(&socket) {
                let (text, ok) = disco::api::ctl::run(&socket, &command)?;
                outln!("{text}")?;
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            // The control socket of `disco run --control`: its line protocol.
            let reply = disco::control::send(&socket, &command.join(" "))?;
            outln!("{reply}")?;
            Ok(if reply.starts_with("ok") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Top { api } => {
            disco::api::top::run(&api)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let topo = config.topology()?;
            outln!(
                "{}: ok - topology {} ({} nodes), policy {} ({}), {} VMs:",
                config.source,
                topo.name,
                topo.node_count(),
                config.policy.name,
                config.policy.source,
                config.vms.len()
            )?;
            for vm in &config.vms {
                let guest = match &vm.linux {
                    Some(l) => format!("Linux kernel {}", l.kernel.display()),
                    None if vm.workload_is_default => format!(
                        "workload {} (the default without a `workload` key: {})",
                        vm.workload.name(),
                        disco::config::DEFAULT_WORKLOAD
                    ),
                    None => format!("workload {}", vm.workload.name()),
                };
                outln!(
                    "  {:<16} {:>2} vCPUs on nodes {:?}, {} MiB on node {}, {guest}, time limit {:.1} s",
                    vm.name,
                    vm.vcpu_nodes.len(),
                    vm.vcpu_nodes,
                    vm.memory_mib,
                    vm.memory_node,
                    vm.time_limit.as_secs_f64()
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topo { fixture } => {
            let topo = match fixture {
                None => Topology::host()?,
                Some(f) if f.ends_with(".xml") => {
                    Topology::from_xml_file(std::path::Path::new(&f))?
                }
                Some(name) => Topology::from_fixture_name(&name)?,
            };
            out(&topo.render_text())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DefaultConfig => {
            out(disco::config::DEFAULT_CONFIG)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what } => bench(what),
    }
}

/// Prints a run's report (text or JSON) and gives the exit status: the
/// signal's when one ended the run, 1 when a VM or a check failed.
fn report_and_exit(report: &disco::report::RunReport, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?)?;
    } else {
        out(&report.render_text())?;
    }
    Ok(if let Some(status) = disco::signals::exit_status() {
        // As a shell reports a process ended by the signal.
        ExitCode::from(status)
    } else if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The scenario files a suite run reads.
fn scenario_files(dir: &Option<PathBuf>) -> anyhow::Result<Vec<ScenarioFile>> {
    match dir {
        Some(d) => ScenarioFile::read_dir(d),
        None => Ok(ScenarioFile::shipped()),
    }
}

/// Loads (validates) every file, then runs them all into one folder.
fn run_files(files: &[ScenarioFile], args: &SuiteArgs) -> anyhow::Result<ExitCode> {
    let loaded = files
        .iter()
        .map(|f| f.load(args.quick, &args.set))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out_dir = args.out.clone().unwrap_or_else(suite::default_out_dir);
    let progress = Progress {
        show: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let command: Vec<String> = std::env::args().collect();
    let command = format!("disco {}", command[1..].join(" "));
    let outcome = suite::run_suite(&loaded, &out_dir, progress, &command)?;
    if args.json {
        for r in &outcome.records {
            outln!("{}", serde_json::to_string_pretty(r)?)?;
        }
    } else {
        out(&suite::headline_table(&outcome.records))?;
    }
    eprintln!(
        "disco bench: {} scenario(s) written to {} (report.md, *.json, *.svg)",
        outcome.records.len(),
        outcome.out_dir.display()
    );
    if outcome.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for (name, e) in &outcome.failures {
            eprintln!("disco bench: {name} failed: {e}");
        }
        Ok(ExitCode::from(1))
    }
}

fn bench(what: BenchCommand) -> anyhow::Result<ExitCode> {
    match what {
        BenchCommand::All(args) => run_files(&scenario_files(&args.dir)?, &args),
        BenchCommand::Run { files, args } => {
            if args.dir.is_some() {
                anyhow::bail!("--dir applies to `all` and scenario names; `run` takes files");
            }
            let files = files
                .iter()
                .map(|f| ScenarioFile::read(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
            run_files(&files, &args)
        }
        BenchCommand::Scenario(argv) => {
            let cli =
                ScenarioCli::try_parse_from(std::iter::once("disco bench".to_string()).chain(argv))
                    .unwrap_or_else(|e| e.exit());
            let files = scenario_files(&cli.args.dir)?;
            let names: Vec<String> = files
                .iter()
                .map(|f| {
                    f.load(cli.args.quick, &[])
                        .map(|l| l.params.name().to_string())
                })
                .collect::<anyhow::Result<_>>()?;
            let Some(i) = names.iter().position(|n| *n == cli.name) else {
                anyhow::bail!(
                    "`{}` is not a scenario or a bench command; scenarios: {}; commands: all, run, compare, list",
                    cli.name,
                    names.join(", ")
                );
            };
            run_files(&files[i..=i], &cli.args)
        }
        BenchCommand::Compare {
            old,
            new,
            threshold,
            fail_on_regression,
            json,
        } => {
            if !(threshold.is_finite() && threshold >= 0.0) {
                anyhow::bail!("--threshold must be a percentage >= 0");
            }
            let c = compare::compare_dirs(&old, &new, threshold)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&c)?)?;
            } else {
                out(&c.render())?;
            }
            let worse = c.regressions().count();
            Ok(if fail_on_regression && worse > 0 {
                eprintln!("disco bench compare: {worse} figure(s) got worse");
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        BenchCommand::List { dir } => {
            outln!(
                "scenarios ({}):",
                dir.as_ref()
                    .map_or("shipped, benches/scenarios/".to_string(), |d| d
                        .display()
                        .to_string())
            )?;
            for f in scenario_files(&dir)? {
                let l = f.load(false, &[])?;
                outln!(
                    "  {:<16} kind {:<10} seeds {:?}  {}",
                    l.params.name(),
                    l.params.kind(),
                    l.seeds,
                    f.source
                )?;
            }
            outln!("kinds:")?;
            for k in suite::KINDS {
                outln!("  {:<10} {}", k.name, k.about)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
