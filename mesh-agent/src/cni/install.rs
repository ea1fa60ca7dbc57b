//! Putting the plugin in place on a node, as istio-cni does: this binary copied to the CNI
//! bin directory as `nodemesh-cni`, and a `nodemesh-cni` entry appended to the plugins of the
//! conflist the runtime uses (the first config file by name in the conf directory). Both are
//! idempotent: run again, they change nothing; if the cluster's CNI rewrote its conflist
//! without our entry, it is appended again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{info, warn};

use super::{DEFAULT_EXCLUDED, DEFAULT_SOCKET, PLUGIN_TYPE};

/// Extensions libcni reads as network configs.
const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// `mesh-agent cni install` / `uninstall`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct InstallArgs {
    /// Directory the container runtime finds CNI plugins in.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Directory of the runtime's network configs; the first by name is the one chained.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's CNI socket, as the plugin (on the host) reaches it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent to enroll a pod.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = timeout)]
    pub timeout: String,
    /// Namespaces whose pods start while the agent is unreachable and its namespace list
    /// cannot tell (repeat the flag for several; an empty value for none).
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE", default_values = DEFAULT_EXCLUDED)]
    pub exclude_namespaces: Vec<String>,
}

fn timeout(s: &str) -> Result<String, String> {
    let d = crate::app::parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
        return Err(format!("{s:?}: between 1s and 5m"));
    }
    Ok(s.to_owned())
}

impl InstallArgs {
    /// The plugin's entry in the conflist.
    fn entry(&self) -> serde_json::Value {
        let excluded: Vec<&String> = self
            .exclude_namespaces
            .iter()
            .filter(|n| !n.is_empty())
            .collect();
        serde_json::json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "timeout": self.timeout,
            "excludeNamespaces": excluded,
        })
    }
}

/// What an install did.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub binary_written: bool,
    pub conflist: PathBuf,
    pub conflist_written: bool,
}

/// Installs the binary at `source` and chains the plugin.
pub fn install(args: &InstallArgs, source: &Path) -> Result<Installed> {
    for ns in args.exclude_namespaces.iter().filter(|n| !n.is_empty()) {
        super::protocol::dns_label(ns).map_err(|e| anyhow::anyhow!("--exclude-namespace: {e}"))?;
    }
    let (binary, binary_written) = install_binary(source, &args.bin_dir)?;
    let (conflist, conflist_written) = chain(args)?;
    Ok(Installed {
        binary,
        binary_written,
        conflist,
        conflist_written,
    })
}

/// Copies `source` to `<bin_dir>/nodemesh-cni` unless it is already there, atomically.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<(PathBuf, bool)> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let new = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    if std::fs::read(&target).is_ok_and(|old| old == new) {
        return Ok((target, false));
    }
    std::fs::create_dir_all(bin_dir)
        .with_context(|| format!("creating the CNI bin directory {}", bin_dir.display()))?;
    super::write_atomic(&target, &new, 0o755)
        .with_context(|| format!("writing {}", target.display()))?;
    Ok((target, true))
}

/// The config file the runtime uses: the first by name with a CNI extension.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading the CNI config directory {}", conf_dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| CONF_EXTENSIONS.iter().any(|c| x == *c))
                && p.is_file()
        })
        .collect();
    files.sort();
    files.into_iter().next().with_context(|| {
        format!(
            "no CNI network config (*.conf, *.conflist, *.json) in {}: nodemesh-cni chains \
             after the cluster's CNI, install that first",
            conf_dir.display()
        )
    })
}

/// Top-level fields of a config file, values kept as written.
type Fields = BTreeMap<String, Box<RawValue>>;

/// A conflist with its plugins and other fields kept as written.
struct ConfList {
    plugins: Vec<Box<RawValue>>,
    /// Every other top-level field (`cniVersion`, `name`, ...).
    rest: BTreeMap<String, Box<RawValue>>,
}

impl ConfList {
    /// A conflist (`Some`), or a single plugin config (`None`, with its top-level fields).
    fn parse(path: &Path, text: &[u8]) -> Result<(Option<ConfList>, Fields)> {
        let mut doc: Fields = serde_json::from_slice(text)
            .with_context(|| format!("{}: not a JSON object", path.display()))?;
        let Some(plugins) = doc.remove("plugins") else {
            return Ok((None, doc));
        };
        let plugins = serde_json::from_str(plugins.get())
            .with_context(|| format!("{}: field plugins: not a list", path.display()))?;
        Ok((Some(ConfList { plugins, rest: doc }), BTreeMap::new()))
    }

    /// `cniVersion` and `name` first, the rest, then the plugins one per line.
    fn render(&self) -> Vec<u8> {
        let key = |k: &str| serde_json::Value::from(k).to_string();
        let first = ["cniVersion", "name"];
        let mut parts: Vec<String> = first
            .iter()
            .filter_map(|k| {
                self.rest
                    .get(*k)
                    .map(|v| format!("  {}: {}", key(k), v.get()))
            })
            .collect();
        parts.extend(
            self.rest
                .iter()
                .filter(|(k, _)| !first.contains(&k.as_str()))
                .map(|(k, v)| format!("  {}: {}", key(k), v.get())),
        );
        let plugins: Vec<String> = self
            .plugins
            .iter()
            .map(|p| format!("    {}", p.get()))
            .collect();
        parts.push(format!("  \"plugins\": [\n{}\n  ]", plugins.join(",\n")));
        format!("{{\n{}\n}}\n", parts.join(",\n")).into_bytes()
    }
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type", default)]
    type_: String,
}

fn plugin_type(p: &RawValue) -> String {
    serde_json::from_str::<TypeOnly>(p.get())
        .map(|t| t.type_)
        .unwrap_or_default()
}

/// Appends the plugin to the primary config (replacing an older entry of ours). A single
/// plugin `.conf` becomes a `.conflist` of the same name with that plugin first, as libcni
/// reads it. Returns the file and whether it was written.
pub fn chain(args: &InstallArgs) -> Result<(PathBuf, bool)> {
    let path = primary_config(&args.conf_dir)?;
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (mut list, target) = match ConfList::parse(&path, &text)? {
        (Some(list), _) => (list, path.clone()),
        (None, single) if single.contains_key("type") => {
            let raw: Box<RawValue> = serde_json::from_slice(&text)
                .with_context(|| format!("{}: not a JSON object", path.display()))?;
            let rest = single
                .into_iter()
                .filter(|(k, _)| k == "cniVersion" || k == "name")
                .collect();
            (
                ConfList {
                    plugins: vec![raw],
                    rest,
                },
                path.with_extension("conflist"),
            )
        }
        (None, _) => bail!(
            "{}: neither a conflist (plugins) nor a plugin config (type)",
            path.display()
        ),
    };
    let ours = RawValue::from_string(args.entry().to_string())?;
    let mut wanted: Vec<Box<RawValue>> = list
        .plugins
        .iter()
        .filter(|p| plugin_type(p) != PLUGIN_TYPE)
        .cloned()
        .collect();
    if wanted.is_empty() {
        bail!(
            "{}: no plugin besides {PLUGIN_TYPE} to chain after",
            path.display()
        );
    }
    wanted.push(ours);
    let same = |a: &[Box<RawValue>], b: &[Box<RawValue>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.get() == y.get())
    };
    if target == path && same(&list.plugins, &wanted) {
        return Ok((path, false));
    }
    list.plugins = wanted;
    super::write_atomic(&target, &list.render(), 0o644)
        .with_context(|| format!("writing {}", target.display()))?;
    if target != path {
        std::fs::remove_file(&path)
            .with_context(|| format!("removing {} (now {})", path.display(), target.display()))?;
    }
    Ok((target, true))
}

/// Removes the plugin's entries from every config in `conf_dir` and the binary from
/// `bin_dir`. Returns what it changed.
pub fn uninstall(args: &InstallArgs) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let entries = std::fs::read_dir(&args.conf_dir)
        .with_context(|| format!("reading {}", args.conf_dir.display()))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for path in files {
        if !path
            .extension()
            .is_some_and(|x| CONF_EXTENSIONS.iter().any(|c| x == *c))
        {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok((Some(mut list), _)) = ConfList::parse(&path, &text) else {
            continue;
        };
        let before = list.plugins.len();
        list.plugins.retain(|p| plugin_type(p) != PLUGIN_TYPE);
        if list.plugins.len() == before {
            continue;
        }
        super::write_atomic(&path, &list.render(), 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        done.push(format!("removed {PLUGIN_TYPE} from {}", path.display()));
    }
    let binary = args.bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&binary) {
        Ok(()) => done.push(format!("removed {}", binary.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", binary.display())),
    }
    Ok(done)
}

/// The agent's side (`run --cni-bin-dir --cni-conf-dir`): install now, then check every
/// `every` that the chain is still there (a cluster CNI that rewrites its conflist on restart
/// drops our entry, and pods would start unmeshed).
pub async fn keep_installed(args: InstallArgs, every: Duration) {
    let mut first = true;
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let a = args.clone();
        let binary = first;
        let result = tokio::task::spawn_blocking(move || {
            if binary {
                let exe = std::env::current_exe().context("finding the agent's own binary")?;
                install(&a, &exe).map(|i| (i.conflist, i.conflist_written))
            } else {
                chain(&a)
            }
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match result {
            Ok((conflist, written)) => {
                if written && !first {
                    warn!(conflist = %conflist.display(), "{PLUGIN_TYPE} was missing from the CNI config (rewritten by the cluster's CNI?); appended again");
                } else if first || written || failing {
                    info!(conflist = %conflist.display(), bin_dir = %args.bin_dir.display(), "{PLUGIN_TYPE} installed and chained");
                }
                first = false;
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(
                        error = format!("{e:#}"),
                        "cannot install the CNI plugin; new pods are not enrolled through CNI until it is (retrying)"
                    );
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
