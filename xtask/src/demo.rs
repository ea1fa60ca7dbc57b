//! `cargo xtask demo`: the bookinfo story on a local testbed. Setup, build, then
//! [`bookinfo::run`]: two nodes with one agent each, bookinfo's pods and services, traffic
//! from the sleep pod through the agents, a summary of what each agent proxied, and teardown
//! on Ctrl-C (or right away with `--no-wait`).

mod bookinfo;
mod prom;
mod report;
mod traces;

use anyhow::{Result, bail};

use crate::setup::{self, SetupArgs};

#[derive(clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Requests the sleep pod sends to productpage.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub requests: u32,
    /// Tear down and exit right after the summary (for scripts); the exit status is non-zero
    /// if a request failed or reviews answered against the routing rules.
    #[arg(long, visible_alias = "exit")]
    pub no_wait: bool,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask demo needs root (network namespaces, cgroups, eBPF); re-run it as root");
    }
    setup::run(&args.setup)?;
    let (agent_bin, testapp_bin) = bookinfo::build_bins()?;
    // From here on SIGINT/SIGTERM lead to a teardown instead of killing us.
    bookinfo::install_signal_handlers()?;
    let outcome = bookinfo::run(&bookinfo::Options {
        agent_bin,
        testapp_bin,
        requests: args.requests as usize,
        wait: !args.no_wait,
    })?;
    outcome.traffic.check()?;
    let t = &outcome.traffic;
    let count =
        |m: &std::collections::BTreeMap<String, usize>, v: &str| m.get(v).copied().unwrap_or(0);
    println!(
        "demo OK (testbed {}): {} requests through the mesh; reviews v1={} v3={} (50/50 split), \
         jason's v2={}",
        outcome.prefix,
        t.requests,
        count(&t.reviews, "v1"),
        count(&t.reviews, "v3"),
        count(&t.jason, report::JASON_VERSION),
    );
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
