//! `tandem-operator`: runs the controller or prints the CRD.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("tandem-operator: not implemented yet")
}
