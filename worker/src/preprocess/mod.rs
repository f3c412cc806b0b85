//! The preprocess role (placeholder until implemented).

/// Preprocess worker configuration.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the preprocess worker until shutdown.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("preprocess role not implemented yet")
}
