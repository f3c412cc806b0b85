//! Test node agent for the local cluster.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("tandem-node-agent: not implemented yet")
}
