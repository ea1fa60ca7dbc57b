//! `cargo xtask pgo`: a profile-guided release build of `mesh-agent`.
//!
//! 1. Builds the agent instrumented (`-Cprofile-generate`) in `target/pgo/gen`.
//! 2. Trains it: `cargo xtask bench --quick` with that agent, L4 then HTTP (iperf3, wrk at 1
//!    and 32 connections, h2load HTTP/2 and gRPC, 1000 idle keep-alive connections), so the
//!    profile holds the data path as the benchmark drives it. Each agent writes its counts
//!    when it exits (the testbed stops agents with SIGTERM; a killed agent writes none).
//! 3. Merges the counts with the toolchain's `llvm-profdata` (rustup's `llvm-tools`
//!    component, installed here if missing) into `target/pgo/mesh-agent.profdata`.
//! 4. Builds the agent again with `-Cprofile-use` in `target/pgo/use` and copies it to
//!    `target/pgo/mesh-agent`.
//!
//! Why: LLVM lays out and inlines hot code by the counts, and marks functions the training
//! never ran `.text.unlikely`; the linker (`-z keep-text-section-prefix`) keeps those apart
//! from the hot ones, so the pages a running agent touches hold less cold code. About 60 % of
//! the agent's text was resident under load without it (a page fault maps the 64 KiB around
//! it), most of it code the data path never calls. `cargo xtask bench --agent
//! target/pgo/mesh-agent` measures the result; `cargo xtask image --agent ...` ships it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{self, BenchArgs};
use crate::setup::{self, SetupArgs};
use crate::util::{Variant, build_bin_with, workspace_root};

#[derive(clap::Args)]
pub struct PgoArgs {
    /// Reuse target/pgo/mesh-agent.profdata from an earlier run: skip the instrumented build
    /// and the training, only build the optimised agent. Only for changed build flags: after
    /// a change to mesh-agent's code or dependencies the profile no longer matches it.
    #[arg(long)]
    reuse_profile: bool,
    #[command(flatten)]
    setup: SetupArgs,
}

pub fn run(args: &PgoArgs) -> Result<()> {
    let dir = workspace_root().join("target/pgo");
    let profile = dir.join("mesh-agent.profdata");
    setup::run(&args.setup)?;
    let sysroot = rustc_output(&["--print", "sysroot"])?;
    let host = host_triple(&rustc_output(&["-vV"])?)?;
    if args.reuse_profile {
        if !profile.is_file() {
            bail!(
                "--reuse-profile: {} does not exist; run `cargo xtask pgo` without it first",
                profile.display()
            );
        }
    } else {
        let profdata = setup::llvm_profdata(Path::new(&sysroot), &host)?;
        let raw = dir.join("raw");
        if raw.exists() {
            fs::remove_dir_all(&raw).with_context(|| format!("emptying {}", raw.display()))?;
        }
        fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
        let instrumented = build_bin_with(
            "mesh-agent",
            "mesh-agent",
            true,
            Some(&Variant {
                target: &host,
                target_dir: &dir.join("gen"),
                rustflags: &[format!("-Cprofile-generate={}", raw.display())],
            }),
        )?;
        for http in [false, true] {
            let what = if http { "http" } else { "l4" };
            eprintln!("pgo: training on the {what} benchmark");
            bench::run(&BenchArgs::training(
                instrumented.clone(),
                http,
                dir.join(format!("training-{what}.md")),
                training_setup(&args.setup),
            ))
            .with_context(|| format!("training on the {what} benchmark"))?;
        }
        let counts = profraw_files(&raw)?;
        eprintln!(
            "pgo: merging {} profile(s) from {}",
            counts.len(),
            raw.display()
        );
        let status = Command::new(&profdata)
            .arg("merge")
            .arg("-o")
            .arg(&profile)
            .args(&counts)
            .status()
            .with_context(|| format!("running {}", profdata.display()))?;
        if !status.success() {
            bail!("{} merge failed ({status})", profdata.display());
        }
    }
    let optimised = build_bin_with(
        "mesh-agent",
        "mesh-agent",
        true,
        Some(&Variant {
            target: &host,
            target_dir: &dir.join("use"),
            rustflags: &use_flags(&profile),
        }),
    )?;
    let out = dir.join("mesh-agent");
    // Copied, not linked: the next build in target/pgo/use must not change what was measured.
    fs::copy(&optimised, &out)
        .with_context(|| format!("copying {} to {}", optimised.display(), out.display()))?;
    println!(
        "pgo: {} (profile {}); measure it with `cargo xtask bench --agent {}`",
        out.display(),
        profile.display(),
        out.display()
    );
    Ok(())
}

/// The optimised build's flags: the profile; only functions the training never ran count
/// as cold; and the linker keeping `.text.hot` and `.text.unlikely` sections apart (lld,
/// rustc's default linker on x86_64 Linux, and GNU ld both take it).
///
/// LLVM's default cold threshold is the count below which the last 0.0001 % of all counts
/// lie, 3 or 4 for a two-minute training: the start-up code, which runs once, then landed in
/// `.text.unlikely` among the code that never runs, and every page it touched there kept its
/// 64 KiB of never-run neighbours resident.
fn use_flags(profile: &Path) -> Vec<String> {
    vec![
        format!("-Cprofile-use={}", profile.display()),
        "-Cllvm-args=-profile-summary-cold-count=0".to_owned(),
        "-Clink-arg=-Wl,-z,keep-text-section-prefix".to_owned(),
    ]
}

/// The `.profraw` files the trained agents left, or an error saying why there are none.
fn profraw_files(raw: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(raw)
        .with_context(|| format!("reading {}", raw.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "the instrumented agents left no profile in {}: an agent writes it only when it \
             exits by itself (after SIGTERM), not when it is killed",
            raw.display()
        );
    }
    Ok(files)
}

fn rustc_output(args: &[&str]) -> Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running rustc {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("rustc {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The `host:` line of `rustc -vV`.
fn host_triple(version: &str) -> Result<String> {
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
        .with_context(|| format!("`rustc -vV` printed no host line:\n{version}"))
}

/// The setup options of the training runs: the user's `--skip-apt` holds there too, while
/// `--force` (rebuilding bpf-linker) was done once already by pgo's own setup.
fn training_setup(setup: &SetupArgs) -> SetupArgs {
    SetupArgs {
        skip_apt: setup.skip_apt,
        force: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_comes_from_rustc_verbose_version() {
        let v = "rustc 1.95.0 (abc 2026-10-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                 release: 1.95.0\n";
        assert_eq!(host_triple(v).unwrap(), "x86_64-unknown-linux-gnu");
        assert!(host_triple("rustc 1.95.0\n").is_err());
    }

    #[test]
    fn no_profile_is_an_error_that_says_why() {
        let dir = std::env::temp_dir().join(format!("pgo-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("notes.txt"), "x").unwrap();
        let err = profraw_files(&dir).unwrap_err().to_string();
        assert!(err.contains("left no profile"), "{err}");
        fs::write(dir.join("default_1_2.profraw"), "x").unwrap();
        assert_eq!(profraw_files(&dir).unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn training_runs_keep_skip_apt_and_do_not_force_again() {
        for skip_apt in [false, true] {
            let user = SetupArgs {
                skip_apt,
                force: true,
            };
            let t = training_setup(&user);
            assert_eq!(t.skip_apt, skip_apt);
            assert!(!t.force);
        }
    }
}
