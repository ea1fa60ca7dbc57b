//! Running iproute2 (`ip`) with checked exit status and stderr in the error.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `ip <args>` and returns its stdout. Fails with the command line, exit status and
/// stderr when `ip` does not exit 0.
pub fn ip<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut full = Vec::with_capacity(args.len() + 2);
    full.push("-n");
    full.push(netns);
    full.extend_from_slice(args);
    ip(&full)
}
