//! Helpers shared by the xtask commands: running cargo from the workspace root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root, as cargo
/// takes it when run there), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    target_dir_from(std::env::var_os("CARGO_TARGET_DIR"), &workspace_root())
}

fn target_dir_from(var: Option<std::ffi::OsString>, root: &Path) -> PathBuf {
    match var.filter(|v| !v.is_empty()) {
        Some(v) => root.join(v),
        None => root.join("target"),
    }
}

/// A `cargo` command (the one that runs us, when known) in the workspace root.
pub fn cargo() -> Command {
    let bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(bin);
    cmd.current_dir(workspace_root());
    // `cargo run` hands us the variables it sets for a package's binary (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Build scripts that watch them (ring's does, through
    // rerun-if-env-changed) would then see a change against a build started from a shell,
    // and everything built after them would be rebuilt: with fat LTO, a 15-minute release
    // build. The child gets the environment a shell would give it.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && run_only_var(k)
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Whether `cargo run` sets `var` for the binary it runs (and a shell would not have it).
fn run_only_var(var: &str) -> bool {
    var.starts_with("CARGO_PKG_")
        || var.starts_with("CARGO_MANIFEST_")
        || matches!(
            var,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}

/// Runs `cargo <args>` with inherited stdio; fails if it fails.
pub fn run_cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = cargo()
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds a binary target of a package and returns the path of the executable cargo
/// produced (read from cargo's JSON messages, so any target directory works).
pub fn build_bin(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    build_bin_with(package, bin, release, None)
}

/// The agent binary to run: `given` (`--agent PATH`) if it exists, else the release build.
pub fn release_agent(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) if path.is_file() => Ok(path.to_path_buf()),
        Some(path) => bail!("--agent {}: no such file", path.display()),
        None => build_bin("mesh-agent", "mesh-agent", true),
    }
}

/// A release build apart from the usual one: its own target directory and compiler flags
/// (`cargo xtask pgo`'s instrumented and optimised builds).
pub struct Variant<'a> {
    /// The host's target triple: with `--target`, the flags reach only the binary's own
    /// crates, not build scripts and proc macros (the eBPF build sets its own flags).
    pub target: &'a str,
    pub target_dir: &'a Path,
    pub rustflags: &'a [String],
}

pub fn build_bin_with(
    package: &str,
    bin: &str,
    release: bool,
    variant: Option<&Variant<'_>>,
) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", package, "--bin", bin];
    if release {
        args.push("--release");
    }
    let dir;
    if let Some(v) = variant {
        dir = v.target_dir.to_string_lossy().into_owned();
        args.extend(["--target", v.target, "--target-dir", &dir]);
    }
    args.push("--message-format=json-render-diagnostics");
    let mut cmd = cargo();
    if let Some(v) = variant {
        // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS and any configured flags.
        let flags = v.rustflags.join("\u{1f}");
        eprintln!("+ CARGO_ENCODED_RUSTFLAGS={:?}", v.rustflags.join(" "));
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    }
    eprintln!("+ cargo {}", args.join(" "));
    let out = cmd
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("building {package} failed ({})", out.status);
    }
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bin
            && let Some(path) = msg["executable"].as_str()
        {
            exe = Some(PathBuf::from(path));
        }
    }
    exe.with_context(|| format!("cargo did not report an executable for {package}/{bin}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_follows_cargo_target_dir() {
        let root = Path::new("/ws");
        assert_eq!(target_dir_from(None, root), Path::new("/ws/target"));
        assert_eq!(
            target_dir_from(Some("".into()), root),
            Path::new("/ws/target")
        );
        assert_eq!(target_dir_from(Some("/t".into()), root), Path::new("/t"));
        assert_eq!(
            target_dir_from(Some("out".into()), root),
            Path::new("/ws/out")
        );
    }

    /// `cargo test` sets the package's variables for us as `cargo run` does for xtask.
    #[test]
    fn child_cargo_gets_a_shells_environment() {
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for var in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO_PKG_VERSION"] {
            assert!(removed.iter().any(|r| r == var), "{var} kept: {removed:?}");
        }
        assert!(!removed.iter().any(|r| r == "PATH" || r == "CARGO_HOME"));
    }
}
