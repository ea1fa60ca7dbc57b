//! `cargo xtask test`: setup, build everything, run every test (root-only tests included
//! when run as root; CI also sets MESH_REQUIRE_PRIVILEGED=1 so they cannot be skipped).

use anyhow::Result;

use crate::setup::{self, SetupArgs};
use crate::util::run_cargo;

#[derive(clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Arguments for the test binaries, after `--test-threads=1` (e.g. a name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    setup::run(&args.setup)?;
    // The workspace's default members: everything but the eBPF crate, which only builds for
    // the BPF target (mesh-agent's build script builds it).
    run_cargo(&["build", "--all-targets"])?;
    let mut test = vec!["test", "--", "--test-threads=1"];
    test.extend(args.test_args.iter().map(String::as_str));
    run_cargo(&test)
}
