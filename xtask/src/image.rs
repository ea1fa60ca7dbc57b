//! `cargo xtask image`: the container image of deploy/Dockerfile. Builds the release
//! `mesh-agent` (its build script compiles and embeds the eBPF programs), lays out the build
//! context (the Dockerfile and the binary), then builds it with the first container engine
//! that works here: docker (with a reachable daemon), podman, or buildah. Without one it
//! stops, naming what it looked for and where the context is, so it can be built elsewhere.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::setup::on_path;
use crate::util::{release_agent, target_dir, workspace_root};

/// The image deploy/'s manifests run (`localhost/`: nothing is published; it never pulls
/// someone else's image of that name).
pub fn default_tag() -> String {
    format!(
        "localhost/nodemesh/mesh-agent:{}",
        env!("CARGO_PKG_VERSION")
    )
}

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Image name and tag.
    #[arg(long, default_value_t = default_tag())]
    pub tag: String,
    /// Use this engine only (docker, podman or buildah) instead of the first that works.
    #[arg(long, value_parser = ["docker", "podman", "buildah"])]
    pub engine: Option<String>,
    /// Base image (the Dockerfile's BASE build argument).
    #[arg(long)]
    pub base: Option<String>,
    /// Only build the binary and lay out the build context; print where it is.
    #[arg(long)]
    pub context_only: bool,
    /// Put this agent binary in the image instead of building the release one (e.g. the
    /// profile-guided build of `cargo xtask pgo`, target/pgo/mesh-agent).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// Engines in the order tried, with the command that proves each can build here.
const ENGINES: [(&str, &[&str]); 3] = [
    // The docker CLI alone is not enough: it needs a daemon.
    ("docker", &["info", "--format", "{{.ServerVersion}}"]),
    ("podman", &["info", "--format", "{{.Version.Version}}"]),
    ("buildah", &["version"]),
];

/// Why an engine was not used, or `Ok` with its path.
pub type Probe = Result<PathBuf, String>;

fn probe(name: &str, check: &[&str]) -> Probe {
    let Some(path) = on_path(name) else {
        return Err("not on PATH".into());
    };
    let out = Command::new(&path)
        .args(check)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} cannot run: {e}", path.display()))?;
    if out.status.success() {
        return Ok(path);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(format!(
        "{} is there but `{name} {}` failed ({}): {why}",
        path.display(),
        check.join(" "),
        out.status
    ))
}

/// The first engine that works, or why none did, one line per engine.
pub fn choose(
    only: Option<&str>,
    probe: impl Fn(&str, &[&str]) -> Probe,
) -> Result<(&'static str, PathBuf), Vec<String>> {
    let mut why = Vec::new();
    for (name, check) in ENGINES {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        match probe(name, check) {
            Ok(path) => return Ok((name, path)),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    Err(why)
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let exe = release_agent(args.agent.as_deref())?;
    let context = target_dir().join("image");
    lay_out(&exe, &context)?;
    println!("image: build context in {}", context.display());
    if args.context_only {
        return Ok(());
    }
    let (engine, path) = match choose(args.engine.as_deref(), probe) {
        Ok(found) => found,
        Err(why) => bail!(
            "no container engine can build here; looked for:\n  {}\nThe build context is \
             ready in {} (Dockerfile and mesh-agent): copy it to a machine with one and run \
             `docker build -t {} {}` there.",
            why.join("\n  "),
            context.display(),
            args.tag,
            context.display()
        ),
    };
    let mut build = Command::new(&path);
    build.arg(if engine == "buildah" { "bud" } else { "build" });
    build
        .args(["-t", &args.tag, "-f"])
        .arg(context.join("Dockerfile"));
    if let Some(base) = &args.base {
        build.args(["--build-arg", &format!("BASE={base}")]);
    }
    build.arg(&context).stdin(Stdio::null());
    eprintln!("+ {engine} build -t {} {}", args.tag, context.display());
    let status = build
        .status()
        .with_context(|| format!("running {}", path.display()))?;
    if !status.success() {
        bail!("`{engine}` failed to build {} ({status})", args.tag);
    }
    println!("image: built {} with {engine}", args.tag);
    Ok(())
}

/// The context: the Dockerfile and the binary, nothing else (a small, fast context).
fn lay_out(exe: &Path, context: &Path) -> Result<()> {
    if context.exists() {
        fs::remove_dir_all(context).with_context(|| format!("clearing {}", context.display()))?;
    }
    fs::create_dir_all(context).with_context(|| format!("creating {}", context.display()))?;
    let dockerfile = workspace_root().join("deploy").join("Dockerfile");
    fs::copy(&dockerfile, context.join("Dockerfile"))
        .with_context(|| format!("copying {}", dockerfile.display()))?;
    let binary = context.join("mesh-agent");
    fs::copy(exe, &binary).with_context(|| format!("copying {}", exe.display()))?;
    // The copy must run: the image holds nothing else.
    let out = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    if !out.status.success() {
        bail!("{} --version failed ({})", binary.display(), out.status);
    }
    println!(
        "image: {} ({} bytes, eBPF programs embedded)",
        String::from_utf8_lossy(&out.stdout).trim(),
        fs::metadata(&binary).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_engine_that_works() {
        let probe = |name: &str, _: &[&str]| -> Probe {
            match name {
                "podman" => Ok(PathBuf::from("/usr/bin/podman")),
                _ => Err("not on PATH".into()),
            }
        };
        assert_eq!(choose(None, probe).unwrap().0, "podman");
        let why = choose(Some("docker"), probe).unwrap_err();
        assert_eq!(why, ["docker: not on PATH"]);
    }

    #[test]
    fn says_why_each_engine_was_not_used() {
        let probe = |name: &str, _: &[&str]| -> Probe {
            Err(if name == "docker" {
                "daemon unreachable".into()
            } else {
                "not on PATH".into()
            })
        };
        let why = choose(None, probe).unwrap_err();
        assert_eq!(
            why,
            [
                "docker: daemon unreachable",
                "podman: not on PATH",
                "buildah: not on PATH"
            ]
        );
    }

    #[test]
    fn the_default_tag_is_the_one_deploy_runs() {
        let agent = workspace_root().join("deploy/base/agent.yaml");
        let text = fs::read_to_string(agent).unwrap();
        assert!(
            text.contains(&format!("image: {}\n", default_tag())),
            "{}",
            default_tag()
        );
    }
}
