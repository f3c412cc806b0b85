//! Test node agent for the local cluster: registers Nodes and runs each pod bound to them as
//! local processes in a network namespace of its own. See `docs/node-agent.md`.

mod agent;
mod backoff;
mod cleanup;
mod config;
mod container;
mod ctx;
mod env;
mod events;
mod image;
mod ipam;
mod net;
mod node;
mod pod;
mod probe;
mod process;
mod status;
mod testserver;
mod token;
mod volumes;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Test-only node agent.
#[derive(Debug, Parser)]
#[command(name = "tandem-node-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register the nodes and run their pods until SIGTERM/SIGINT.
    Run(Box<config::RunArgs>),
    /// Kill all pod processes, delete the pod network namespaces and the bridge.
    Cleanup(cleanup::CleanupArgs),
    /// Tiny HTTP server used as the `tandem-testserver` image.
    Testserver(testserver::TestserverArgs),
    /// Internal: runs inside a pod's namespaces, mounts its volumes and execs the container.
    #[command(hide = true)]
    ExecContainer {
        /// `SRC=DST[:ro]` bind mounts.
        #[arg(long = "bind")]
        binds: Vec<String>,
        /// User ID to run as.
        #[arg(long)]
        uid: Option<u32>,
        /// Group ID to run as.
        #[arg(long)]
        gid: Option<u32>,
        /// Working directory.
        #[arg(long, default_value = "/")]
        workdir: PathBuf,
        /// Program and arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::ExecContainer {
        binds,
        uid,
        gid,
        workdir,
        argv,
    } = &cli.command
    {
        // Runs before any runtime exists: it only mounts and execs.
        let err = process::exec_container(binds, *uid, *gid, workdir, argv);
        eprintln!("tandem-node-agent exec-container: {err}");
        std::process::exit(127);
    }
    init_tracing();
    let rt = tokio::runtime::Runtime::new().context("starting tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Run(args) => agent::run(*args).await,
            Command::Cleanup(args) => cleanup::run(&args).await,
            Command::Testserver(args) => testserver::run(&args).await,
            Command::ExecContainer { .. } => Ok(()),
        }
    })
}
