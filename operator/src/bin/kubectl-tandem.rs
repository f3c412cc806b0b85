//! `kubectl tandem`: a kubectl plugin for Tandem rollouts. Install the binary on `PATH` as
//! `kubectl-tandem`; kubectl finds it. Everything it does is also possible with plain kubectl
//! (see docs/rollouts.md): it reads status and writes the same annotations and spec fields.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tandem_operator::crd::InferencePipeline;
use tandem_operator::rollout::view;

/// Rollouts of Tandem InferencePipelines.
#[derive(Parser, Debug)]
#[command(name = "kubectl tandem", version)]
struct Cli {
    /// Namespace of the pipeline (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what serves, the rollout's phase, step, traffic and shadow parity counts.
    Status {
        /// Pipeline name.
        name: String,
        /// Refresh every second until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// Skip the remaining shadow and traffic steps and make the candidate active now.
    Promote {
        /// Pipeline name.
        name: String,
    },
    /// Stop the rollout: all traffic back to the active color, candidate removed.
    Abort {
        /// Pipeline name.
        name: String,
    },
    /// Set spec.inference.model back to the model served before the last rollout.
    Undo {
        /// Pipeline name.
        name: String,
    },
    /// Hold the rollout at its current step (spec.rollout.paused = true).
    Pause {
        /// Pipeline name.
        name: String,
    },
    /// Let a paused rollout continue.
    Resume {
        /// Pipeline name.
        name: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = tandem_operator::client::infer()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or in-cluster config)")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<InferencePipeline> = Api::namespaced(client, &ns);
    let get = |name: String| {
        let api = api.clone();
        let ns = ns.clone();
        async move {
            api.get(&name)
                .await
                .with_context(|| format!("reading inferencepipeline {ns}/{name}"))
        }
    };
    let patch = |name: String, body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .with_context(|| format!("patching inferencepipeline {name}"))
        }
    };
    match cli.command {
        Command::Status { name, watch } => loop {
            let p = get(name.clone()).await?;
            if watch {
                // Clear the screen and redraw, like `watch`.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", view::describe(&p));
            if !watch {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        Command::Promote { name } => {
            let body = view::action_patch(&get(name.clone()).await?, true)?;
            patch(name.clone(), body).await?;
            println!("inferencepipeline {ns}/{name}: promotion requested");
        }
        Command::Abort { name } => {
            let body = view::action_patch(&get(name.clone()).await?, false)?;
            patch(name.clone(), body).await?;
            println!("inferencepipeline {ns}/{name}: abort requested");
        }
        Command::Undo { name } => {
            let body = view::undo_patch(&get(name.clone()).await?)?;
            let version = body["spec"]["inference"]["model"]["version"].clone();
            patch(name.clone(), body).await?;
            println!(
                "inferencepipeline {ns}/{name}: spec.inference.model set back to version {version}; a rollout to it starts"
            );
        }
        Command::Pause { name } => {
            patch(name.clone(), view::pause_patch(true)).await?;
            println!("inferencepipeline {ns}/{name}: rollout paused");
        }
        Command::Resume { name } => {
            patch(name.clone(), view::pause_patch(false)).await?;
            println!("inferencepipeline {ns}/{name}: rollout resumed");
        }
    }
    Ok(())
}
