//! `tandem-worker`: one binary, two roles (`preprocess`, `inference`).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("tandem-worker: not implemented yet")
}
