//! `tandem-operator`: runs the controller or prints the CRD.

use clap::{Parser, Subcommand};

/// The Tandem operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the InferencePipeline CRD as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", tandem_operator::crd::crd_yaml()?);
            Ok(())
        }
    }
}
