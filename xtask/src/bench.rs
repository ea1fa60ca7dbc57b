//! `cargo xtask bench`: mesh vs direct connection, medians and ratios.

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: &BenchArgs) -> Result<()> {
    bail!("cargo xtask bench: not implemented yet")
}
