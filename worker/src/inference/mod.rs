//! The inference role (placeholder until implemented).

/// Inference worker configuration.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the inference worker until shutdown.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("inference role not implemented yet")
}
