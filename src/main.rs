//! The `disco` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Benchmarks on real KVM: VM density, disco vs a bare-KVM runner, page
    /// sharing vs Linux KSM.
    Bench {
        #[arg(value_enum)]
        scenario: BenchScenario,
        /// Print the result as JSON on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// Fewer repetitions (a quick look, not a figure to publish).
        #[arg(long)]
        quick: bool,
        /// Repetitions (default: density 3, overhead 10; with --quick 1 and 3;
        /// sharing: sweep runs 5 and copy-on-write rewrites 3, with --quick 3 and 2).
        #[arg(long)]
        reps: Option<usize>,
        /// density: number of VMs (default 100); sharing: (default 8).
        #[arg(long)]
        vms: Option<usize>,
        /// density: guest RAM per VM in MiB (default 4); sharing: (default 32).
        #[arg(long)]
        mib: Option<u64>,
        /// sharing: directory for sharing.json, sharing.md and
        /// sharing-savings.svg.
        #[arg(long, value_name = "DIR", default_value = "bench-results")]
        out: PathBuf,
        /// sharing: disco's scanner rate (default 100000, the policy default).
        #[arg(long, value_name = "PAGES")]
        pages_per_second: Option<u64>,
        /// overhead: the shipped policy disco runs with (repeatable; default
        /// static, i.e. the monitor without sharing; `disco` is the default
        /// policy of `disco run`, with sharing).
        #[arg(long = "policy", value_name = "POLICY")]
        policies: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchScenario {
    /// Create and start many micro-VMs: VMs per second, memory per VM beyond guest RAM.
    Density,
    /// The same workloads run by disco and by a bare-KVM runner on anonymous memory.
    Overhead,
    /// disco's page sharing vs Linux KSM on the same guests: time, CPU, savings,
    /// copy-on-write latency, guest slowdown (needs root; restores KSM's settings).
    Sharing,
    /// VMs placed badly on the 4-node fixture, under each shipped policy:
    /// local-access fraction and modelled cost over time.
    Locality,
    /// Pages migrated per second vs this machine's memcpy, and the slowdown
    /// of a guest whose pages move.
    Migration,
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
    match real_main(Cli::parse()) {
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
        } => {
            let config = load_config(&config)?;
            let options = RunOptions {
                progress: !quiet && !json,
                ..RunOptions::default()
            };
            let report = monitor::run(&config, &options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            Ok(if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let topo = config.topology()?;
            println!(
                "{}: ok - topology {} ({} nodes), policy {} ({}), {} VMs:",
                config.source,
                topo.name,
                topo.node_count(),
                config.policy.name,
                config.policy.source,
                config.vms.len()
            );
            for vm in &config.vms {
                println!(
                    "  {:<16} {:>2} vCPUs on nodes {:?}, {} MiB on node {}, workload {}, time limit {:.1} s",
                    vm.name,
                    vm.vcpu_nodes.len(),
                    vm.vcpu_nodes,
                    vm.memory_mib,
                    vm.memory_node,
                    vm.workload.name(),
                    vm.time_limit.as_secs_f64()
                );
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
            print!("{}", topo.render_text());
            Ok(ExitCode::SUCCESS)
        }
        Command::DefaultConfig => {
            print!("{}", disco::config::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            scenario,
            json,
            quick,
            reps,
            vms,
            mib,
            out,
            pages_per_second,
            policies,
        } => {
            use disco::bench::{density, overhead, sharing};
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if pages_per_second.is_some() && !matches!(scenario, BenchScenario::Sharing) {
                anyhow::bail!("--pages-per-second applies to the sharing scenario only");
            }
            let (table, json_text) = match scenario {
                BenchScenario::Migration => {
                    let mut options = disco::bench::migration::MigrationOptions::standard(quick);
                    options.reps = reps.unwrap_or(options.reps);
                    options.mib = mib.unwrap_or(options.mib);
                    options.progress = progress;
                    let result = disco::bench::migration::run(&options)?;
                    (
                        result.render_table(),
                        serde_json::to_string_pretty(&result)?,
                    )
                }
                BenchScenario::Locality => {
                    let mut options = disco::bench::locality::LocalityOptions::standard(quick);
                    options.vms = vms.unwrap_or(options.vms);
                    options.memory_mib = mib.unwrap_or(options.memory_mib);
                    if !policies.is_empty() {
                        options.policies = policies.clone();
                    }
                    options.progress = progress;
                    let result = disco::bench::locality::run(&options)?;
                    let files = result.write_outputs(&out)?;
                    let names: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    eprintln!("disco bench locality: wrote {}", names.join(", "));
                    (
                        result.render_table(),
                        serde_json::to_string_pretty(&result)?,
                    )
                }
                BenchScenario::Density => {
                    if !policies.is_empty() {
                        anyhow::bail!("--policy applies to the overhead scenario only");
                    }
                    let mut options = density::DensityOptions::standard(quick);
                    options.reps = reps.unwrap_or(options.reps);
                    options.vms = vms.unwrap_or(options.vms);
                    options.memory_mib = mib.unwrap_or(options.memory_mib);
                    options.progress = progress;
                    let result = density::run(&options)?;
                    (
                        result.render_table(),
                        serde_json::to_string_pretty(&result)?,
                    )
                }
                BenchScenario::Overhead => {
                    if vms.is_some() || mib.is_some() {
                        anyhow::bail!(
                            "--vms and --mib apply to the density and sharing scenarios only"
                        );
                    }
                    let policies: Vec<&str> = if policies.is_empty() {
                        vec![overhead::STATIC]
                    } else {
                        policies.iter().map(String::as_str).collect()
                    };
                    let mut options = overhead::OverheadOptions::with_policies(quick, &policies);
                    options.reps = reps.unwrap_or(options.reps);
                    options.progress = progress;
                    let result = overhead::run(&options)?;
                    (
                        result.render_table(),
                        serde_json::to_string_pretty(&result)?,
                    )
                }
                BenchScenario::Sharing => {
                    if !policies.is_empty() {
                        anyhow::bail!("--policy applies to the overhead scenario only");
                    }
                    let mut options = sharing::SharingOptions::standard(quick);
                    if let Some(reps) = reps {
                        options.sweep.reps = reps;
                        options.cow_reps = reps;
                    }
                    options.vms = vms.unwrap_or(options.vms);
                    options.mib_per_vm = mib.unwrap_or(options.mib_per_vm);
                    options.pages_per_second = pages_per_second.unwrap_or(options.pages_per_second);
                    options.progress = progress;
                    let result = sharing::run(&options)?;
                    let files = result.write_outputs(&out)?;
                    let names: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    eprintln!("disco bench sharing: wrote {}", names.join(", "));
                    (
                        result.render_table(),
                        serde_json::to_string_pretty(&result)?,
                    )
                }
            };
            if json {
                println!("{json_text}");
            } else {
                print!("{table}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
