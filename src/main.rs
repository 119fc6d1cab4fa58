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
    }
}
