//! `mesh-agent`: the nodemesh node agent and its CLI, one binary.

mod admin;
mod app;
mod ca;
mod capture;
mod check;
mod cli;
mod cni;
mod config;
#[cfg(test)]
mod deploy_tests;
mod identity;
mod proxy;
mod sys;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc, as ztunnel does. An idle keep-alive client connection
/// holds hyper's two 8 KiB buffers with about a page of each written: with jemalloc the rest
/// stays untouched and costs nothing (10.5 KiB of RSS per idle connection against glibc's
/// 17.2; docs/performance.md). Its background thread (the `background_threads` feature) gives
/// freed memory back while the agent is idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Gives the pages of memory freed so far back to the kernel now, not after jemalloc's decay
/// (10 s): for start-up's one-off allocations, such as the kernel BTF that aya's loader
/// parses (`capture`), about 10 MB. `false` if jemalloc refused.
pub fn release_freed_memory() -> bool {
    // `arena.<i>.purge` with i = MALLCTL_ARENAS_ALL (4096): every arena. tikv-jemalloc-ctl
    // has no call for it (its `raw::write` passes a value, which this command refuses).
    let name = c"arena.4096.purge";
    // SAFETY: a NUL-terminated name and no old or new value, as the command takes none.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0
}

/// Default path of the admin unix socket, shared by `run` and the inspection commands.
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/run/nodemesh/admin.sock";

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "nodemesh node agent: eBPF capture, L4 proxying, and the commands to inspect it",
    long_about = "nodemesh node agent.\n\nOne agent runs per node. It enrolls the pods of namespaces labelled \
nodemesh.io/enabled=true, captures their outbound TCP connections with eBPF and proxies them. \
`run` starts the agent; `workloads` and `check` inspect a node."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (needs root: loads eBPF, enters pods' network namespaces).
    Run(Box<app::RunArgs>),
    /// The mesh certificate authority: serve the signing API, or issue certificates offline
    /// (`ca issue`, `ca root`).
    #[command(long_about = ca::LONG_ABOUT)]
    Ca(Box<ca::CaArgs>),
    /// List this node's enrolled pods, as the running agent sees them.
    Workloads {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Workload certificates: identity, serial, validity and state (valid, renewing after a
    /// failed renewal, expired, pending).
    Certs {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// The connections the agent is proxying now: pod, direction, protocol (HBONE or TCP),
    /// client, destination, upstream, the peer's identity, age and bytes each way.
    Connections {
        /// Only this pod's (`NAMESPACE/NAME`, or `NAME` in any namespace).
        #[arg(long, value_name = "POD")]
        pod: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// The effective HTTP routes per Service port: the VirtualService in force, each rule's
    /// match, and the destinations (subset, weight, healthy endpoints) it sends requests to.
    Routes {
        /// As this pod sees them (`NAMESPACE/NAME`, or `NAME` in `default`): rules for other
        /// source labels or namespaces, and VirtualServices not exported to its namespace,
        /// are left out.
        #[arg(value_name = "POD")]
        pod: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Services with their ports, protocol selection and ready endpoints.
    Services {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// The running agent: version, readiness, config generation and errors, workloads,
    /// eBPF counters.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Show whether the running agent's eBPF fast path is on and why, or switch it at
    /// runtime. Off takes effect at once for every connection (each stays on the TCP/IP stack
    /// from its next write); on applies to new connections and is refused unless the
    /// agent's start-up self-test passed.
    FastPath {
        /// `on` or `off`; without it, prints the current state.
        #[arg(value_enum)]
        set: Option<cli::Switch>,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Show the running agent's log filter, or change it without a restart.
    Logging {
        /// New filter in tracing's EnvFilter syntax: a level (`debug`) or per-module
        /// directives (`info,mesh_agent::proxy=debug`). Without it, prints the current one.
        #[arg(long, value_name = "FILTER")]
        level: Option<String>,
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// This binary's version and, if it answers, the running agent's.
    Version {
        /// Admin unix socket of the agent to ask.
        #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Analyze Kubernetes and Istio YAML offline, as `istioctl analyze` does: Istio's codes
    /// and line format; exit status 1 when errors are found, 2 when input is unreadable.
    #[command(long_about = cli::analyze::LONG_ABOUT)]
    Analyze {
        /// YAML files (`-`: standard input, e.g. from `kubectl kustomize`), or directories
        /// whose *.yaml/*.yml files are read (not recursive; kustomization.yaml skipped).
        #[arg(value_name = "FILES|DIRS", required = true)]
        paths: Vec<PathBuf>,
        /// Output format: Istio's lines (table), or a list of {code, level, resource,
        /// message, origin} as JSON or YAML.
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
        /// Apply local mode's rules too (`mesh-agent run --manifests`): Services need a
        /// selector, pods of enrolled namespaces with a node need the nodemesh.io/netns
        /// annotation.
        #[arg(long)]
        local: bool,
    },
    /// Check the kernel prerequisites (cgroup2, bpffs, BTF, program and map types,
    /// privileges); exits non-zero if any is missing.
    Check {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The CNI plugin that enrolls each new pod before its containers start. Without a
    /// subcommand it acts as the plugin (CNI_COMMAND, CNI_* and the config on stdin), as it
    /// does when run under the name nodemesh-cni.
    #[command(long_about = CNI_ABOUT)]
    Cni {
        #[command(subcommand)]
        action: Option<CniAction>,
    },
}

const CNI_ABOUT: &str = "The CNI plugin that enrolls each new pod before its containers start.\n\n\
Without a subcommand it acts as the plugin: the container runtime runs it (installed as \
nodemesh-cni) with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and the network \
config on stdin. ADD asks the agent (agentSocket) to enroll the pod and returns once it is \
enrolled or known not to be meshed; if the agent cannot be reached, ADD fails unless the agent's \
last namespace list says the pod's namespace is not enrolled (fail closed).";

#[derive(Subcommand, Debug)]
enum CniAction {
    /// Copy this binary to the CNI bin directory as nodemesh-cni and append the plugin to the
    /// runtime's conflist (the first config by name). Idempotent.
    Install(cni::install::InstallArgs),
    /// Remove the plugin's entry from every conflist and the binary.
    Uninstall(cni::install::InstallArgs),
}

fn main() -> ExitCode {
    // Installed as nodemesh-cni, the runtime runs this binary as a CNI plugin: no arguments.
    if cni::invoked_as_plugin(std::env::args_os().next().as_deref()) {
        return cni::plugin::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match app::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Ca(args) => match ca::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-agent ca: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Workloads {
            output,
            admin_socket,
        } => client_command(cli::workloads::run(&admin_socket, output)),
        Command::Certs {
            output,
            admin_socket,
        } => client_command(cli::certs::run(&admin_socket, output)),
        Command::Connections {
            pod,
            output,
            admin_socket,
        } => client_command(cli::connections::run(&admin_socket, output, pod.as_deref())),
        Command::Routes {
            pod,
            output,
            admin_socket,
        } => client_command(cli::routes::run(&admin_socket, output, pod.as_deref())),
        Command::Services {
            output,
            admin_socket,
        } => client_command(cli::services::run(&admin_socket, output)),
        Command::Status {
            output,
            admin_socket,
        } => client_command(cli::status::status(&admin_socket, output)),
        Command::Logging {
            level,
            admin_socket,
        } => client_command(cli::status::logging(&admin_socket, level.as_deref())),
        Command::FastPath { set, admin_socket } => client_command(cli::status::fast_path_command(
            &admin_socket,
            set.map(|s| s == cli::Switch::On),
        )),
        Command::Version { admin_socket } => client_command(cli::status::version(&admin_socket)),
        Command::Cni { action } => cni_command(action),
        Command::Analyze {
            paths,
            output,
            local,
        } => cli::analyze::run(&paths, output, local),
        Command::Check { json } => {
            if check::print(&check::run_checks(), json) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn cni_command(action: Option<CniAction>) -> ExitCode {
    let result = match action {
        None => return cni::plugin::main(),
        Some(CniAction::Install(args)) => std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|exe| cni::install::install(&args, &exe))
            .map(|done| {
                let said = |written| {
                    if written {
                        "installed"
                    } else {
                        "already in place"
                    }
                };
                println!("{}: {}", done.binary.display(), said(done.binary_written));
                println!(
                    "{}: {} chained",
                    done.conflist.display(),
                    said(done.conflist_written)
                );
            }),
        Some(CniAction::Uninstall(args)) => cni::install::uninstall(&args).map(|done| {
            if done.is_empty() {
                println!("nothing to remove");
            }
            done.iter().for_each(|d| println!("{d}"));
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one inspection command on a small single-threaded runtime.
fn client_command(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-agent: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod allocator_tests {
    fn rss_anon_kib() -> u64 {
        mesh_testbed::status_kib("self", "RssAnon").expect("RssAnon")
    }

    #[test]
    fn freed_memory_goes_back_to_the_kernel_at_once() {
        // 32 MiB in blocks below jemalloc's oversize threshold (8 MiB), written so that they
        // are resident, then freed: jemalloc keeps them (decay) until purged.
        let blocks: Vec<Vec<u8>> = (0..8).map(|i| vec![i + 1; 4 << 20]).collect();
        assert!(blocks.iter().all(|b| b[b.len() - 1] != 0));
        drop(blocks);
        let before = rss_anon_kib();
        assert!(crate::release_freed_memory(), "jemalloc refused the purge");
        let after = rss_anon_kib();
        assert!(
            before.saturating_sub(after) >= 8 << 10,
            "RssAnon {before} KiB before the purge, {after} KiB after"
        );
    }
}
