//! `tandem-worker`: one binary, two roles (`preprocess`, `inference`).

use clap::{Parser, Subcommand};

// Re-exported so `crate::common` / `crate::config` resolve inside the binary's
// own modules (the inference role) as well as in the library.
use tandem_worker::preprocess;
pub use tandem_worker::{common, config};

mod inference;

/// Tandem worker: the CPU preprocess stage or the GPU/CPU inference stage.
#[derive(Debug, Parser)]
#[command(name = "tandem-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Decode/resize/normalize images or tokenize text, then forward to inference pods.
    Preprocess(preprocess::Args),
    /// Load a model and serve batched inference over OIP v2.
    Inference(inference::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (result, termination_log) = match cli.role {
        Role::Preprocess(args) => {
            let path = args.termination_log.clone();
            (preprocess::run(args), path)
        }
        Role::Inference(args) => {
            let path = args.termination_log.clone();
            (inference::run(args), path)
        }
    };
    if let Err(e) = &result {
        common::write_termination_message(&termination_log, &format!("{e:#}"));
    }
    result
}
