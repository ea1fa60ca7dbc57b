//! `cargo xtask testbed`: a local testbed that lives across invocations (prefix `nmtb`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_testbed::{CLI_PREFIX, STATE_ROOT, Testbed, TestbedConfig};

use crate::util::build_bin;

#[derive(Args)]
pub struct TestbedArgs {
    #[command(subcommand)]
    cmd: TestbedCmd,
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Create the testbed from a directory of Kubernetes/Istio YAML and start one agent per node.
    Up {
        /// Directory with *.yaml / *.yml manifests.
        #[arg(long)]
        manifests: PathBuf,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// mesh-agent binary to run (default: build it with `cargo build -p mesh-agent`).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Build the agent in release mode (when --agent is not given).
        #[arg(long)]
        release: bool,
        /// Create nodes and pods only; start no agents.
        #[arg(long, conflicts_with = "agent")]
        no_agent: bool,
        /// Extra argument for every agent (repeatable).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Run a command inside a pod (POD = name or namespace/name); the exit code is propagated.
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Render manifest files into the running testbed again (new pods are created).
    Apply {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show nodes, pods, services and agents.
    Status,
    /// Remove the testbed (everything it created).
    Down {
        /// Another testbed's prefix (e.g. one a killed test left behind).
        #[arg(long)]
        prefix: Option<String>,
        /// Also remove every testbed whose owning process is gone.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(args: TestbedArgs) -> Result<()> {
    match args.cmd {
        TestbedCmd::Up {
            manifests,
            nodes,
            agent,
            release,
            no_agent,
            agent_args,
        } => up(&manifests, nodes, agent, release, no_agent, agent_args),
        TestbedCmd::Exec { pod, cmd } => exec(&pod, &cmd),
        TestbedCmd::Apply { files } => apply(&files),
        TestbedCmd::Status => status(),
        TestbedCmd::Down { prefix, all } => down(prefix.as_deref(), all),
    }
}

fn cli_state_dir() -> PathBuf {
    Path::new(STATE_ROOT).join(CLI_PREFIX)
}

fn up(
    manifests: &Path,
    nodes: usize,
    agent: Option<PathBuf>,
    release: bool,
    no_agent: bool,
    agent_args: Vec<String>,
) -> Result<()> {
    if cli_state_dir().exists() {
        bail!(
            "a testbed is already up ({}); run `cargo xtask testbed down` first",
            cli_state_dir().display()
        );
    }
    let mut cfg = TestbedConfig::new(nodes).manifests_dir(manifests)?;
    if cfg.manifests.is_empty() {
        eprintln!("note: {} holds no *.yaml/*.yml files", manifests.display());
    }
    cfg.prefix = Some(CLI_PREFIX.to_string());
    cfg.detach = true;
    cfg.name_hint = Some("cargo xtask testbed".to_string());
    cfg.agent_args = agent_args;
    if !no_agent {
        // Agents run with the mesh CA, as the mesh is meant to run: mutual TLS between pods.
        cfg.ca = true;
        let bin = match agent {
            Some(path) => path
                .canonicalize()
                .with_context(|| format!("agent binary {}", path.display()))?,
            None => build_bin("mesh-agent", "mesh-agent", release)?,
        };
        cfg.agent_bin = Some(bin);
    }
    let tb = Testbed::up(cfg)?;
    print_testbed(&tb);
    println!();
    println!("run a command in a pod:  cargo xtask testbed exec <pod> -- <command...>");
    println!("re-render manifests:     cargo xtask testbed apply <file.yaml>...");
    println!("show state:              cargo xtask testbed status");
    println!("take it down:            cargo xtask testbed down");
    tb.keep()
}

fn print_testbed(tb: &Testbed) {
    println!(
        "testbed {} (state {})",
        tb.prefix(),
        tb.state_dir().display()
    );
    println!("manifests: {}", tb.manifests_dir().display());
    println!("nodes:");
    for n in tb.nodes() {
        println!(
            "  {:<8} {:<12} netns {:<14} pod CIDR {:<14} cgroup {}",
            n.name,
            n.ip.to_string(),
            n.netns,
            n.pod_cidr,
            n.cgroup.display()
        );
        println!("           admin socket {}", n.admin_socket.display());
        println!("           agent log    {}", n.agent_log.display());
    }
    println!("pods:");
    if tb.pods().is_empty() {
        println!("  (none)");
    }
    for p in tb.pods() {
        println!(
            "  {:<32} {:<8} {:<12} netns {}",
            p.key(),
            p.node,
            p.ip.to_string(),
            p.netns
        );
    }
    println!("services:");
    let services = tb.services();
    if services.is_empty() {
        println!("  (none)");
    }
    for (name, ip) in services {
        println!("  {name:<32} {ip}");
    }
}

fn load_cli() -> Result<Testbed> {
    if !cli_state_dir().exists() {
        bail!("no testbed is up; start one with `cargo xtask testbed up --manifests DIR`");
    }
    Testbed::load(None)
}

fn exec(pod: &str, cmd: &[String]) -> Result<()> {
    let tb = load_cli()?;
    let Some((program, args)) = cmd.split_first() else {
        bail!("no command given");
    };
    let status = tb
        .pod_command(pod, program)?
        .args(args)
        .status()
        .with_context(|| format!("running {program} in pod {pod}"))?;
    let code = match status.code() {
        Some(c) => c,
        None => {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }
    };
    std::process::exit(code);
}

fn apply(files: &[PathBuf]) -> Result<()> {
    let mut tb = load_cli()?;
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no usable file name", f.display()))?;
        let yaml =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        tb.apply(name, &yaml)?;
        println!(
            "applied {} -> {}",
            f.display(),
            tb.manifests_dir().join(name).display()
        );
    }
    print_testbed(&tb);
    Ok(())
}

fn status() -> Result<()> {
    if cli_state_dir().exists() {
        let mut tb = Testbed::load(None)?;
        print_testbed(&tb);
        println!("agents:");
        for node in tb.node_names() {
            let line = if tb.agent_running(&node) {
                let pid = tb.agent_pid(&node).unwrap_or(0);
                match tb.admin_get(&node, "/healthz/ready") {
                    Ok((code, _)) => format!("running (pid {pid}), /healthz/ready {code}"),
                    Err(e) => format!("running (pid {pid}), admin API: {e:#}"),
                }
            } else {
                "not running".to_string()
            };
            println!("  {node:<8} {line}");
        }
    } else {
        println!("no testbed ({CLI_PREFIX}) is up");
    }
    let others: Vec<_> = mesh_testbed::list_testbeds()
        .into_iter()
        .filter(|(p, _, _)| p != CLI_PREFIX)
        .collect();
    if !others.is_empty() {
        println!("other testbeds (tests):");
        for (prefix, owner, hint) in others {
            let alive = owner.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            println!(
                "  {prefix:<8} owner {} {} {}",
                owner.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                if alive {
                    "(running)"
                } else {
                    "(gone: `cargo xtask testbed down --all`)"
                },
                hint.unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn down(prefix: Option<&str>, all: bool) -> Result<()> {
    let mut errors = Vec::new();
    let target = prefix.unwrap_or(CLI_PREFIX);
    if Path::new(STATE_ROOT).join(target).exists() || prefix.is_some() {
        match mesh_testbed::remove_leftovers(target) {
            Ok(()) => println!("testbed {target} removed"),
            Err(e) => errors.push(format!("{e:#}")),
        }
    } else if !all {
        println!("no testbed ({target}) is up");
    }
    if all {
        for (p, owner, _) in mesh_testbed::list_testbeds() {
            let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if alive && p != CLI_PREFIX {
                println!(
                    "keeping testbed {p}: its process {} is running",
                    owner.unwrap_or(0)
                );
                continue;
            }
            match mesh_testbed::remove_leftovers(&p) {
                Ok(()) => println!("testbed {p} removed"),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        for p in mesh_testbed::orphan_prefixes() {
            match mesh_testbed::remove_leftovers(&p) {
                Ok(()) => println!("leftovers of testbed {p} removed"),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}
