//! `cargo xtask demo`: the bookinfo story on a local testbed.

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct DemoArgs {}

pub fn run(_args: &DemoArgs) -> Result<()> {
    bail!("cargo xtask demo: not implemented yet")
}
