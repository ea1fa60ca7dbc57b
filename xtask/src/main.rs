//! `cargo xtask`: the project's own automation.

mod bench;
mod demo;
mod image;
mod pgo;
mod setup;
mod test_cmd;
mod testbed_cmd;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "nodemesh automation",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make this machine ready to build and test nodemesh (toolchains, bpf-linker, packages).
    Setup(setup::SetupArgs),
    /// Run setup, build everything, then run all tests (one test thread).
    Test(test_cmd::TestArgs),
    /// Run the bookinfo demo on a local testbed.
    Demo(demo::DemoArgs),
    /// Benchmark the mesh against direct connections.
    Bench(bench::BenchArgs),
    /// Manage a local testbed: nodes and pods as network namespaces, one agent per node.
    Testbed(testbed_cmd::TestbedArgs),
    /// Build the container image of deploy/Dockerfile (release binary, then docker, podman or
    /// buildah; without one, leaves the build context and says where).
    Image(image::ImageArgs),
    /// Build a profile-guided release agent (instrumented build, training on the benchmark's
    /// loads, optimised build) into target/pgo/mesh-agent.
    Pgo(pgo::PgoArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup(args) => setup::run(&args),
        Cmd::Test(args) => test_cmd::run(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Testbed(args) => testbed_cmd::run(args),
        Cmd::Image(args) => image::run(&args),
        Cmd::Pgo(args) => pgo::run(&args),
    }
}
