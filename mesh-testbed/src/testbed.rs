//! The testbed: building nodes and pods, rendering manifests, running commands in pods.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::ipam::{self, Ipam};
use crate::process::ProcId;
use crate::render::{self, Placement, PodRequest};
use crate::{STATE_ROOT, TestbedConfig, cgroup, netns};

/// A node: a network namespace on the fabric, a cgroup, and (optionally) an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// 1-based.
    pub index: usize,
    /// `node-<index>`.
    pub name: String,
    /// Fabric address 10.250.0.<index>.
    pub ip: Ipv4Addr,
    /// 10.244.<index>.0/24.
    pub pod_cidr: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub admin_socket: PathBuf,
    pub agent_log: PathBuf,
    pub bpffs_dir: PathBuf,
}

/// A pod: its own network namespace (or the node's, for hostNetwork pods) and cgroup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `node-<i>`.
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    /// The node-side veth (None for hostNetwork pods).
    pub host_veth: Option<String>,
    pub host_network: bool,
}

impl PodInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything recorded about a testbed; persisted as `<state>/testbed.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub prefix: String,
    pub name_hint: Option<String>,
    pub owner_pid: u32,
    pub state_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub fabric_netns: String,
    /// Every network namespace created, in creation order.
    pub created_netns: Vec<String>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub ipam: Ipam,
    pub pod_counter: usize,
    /// Manifest file name -> keys of the pods it defines.
    pub files: BTreeMap<String, Vec<String>>,
    pub agent_bin: Option<PathBuf>,
    pub agent_args: Vec<String>,
    pub detach: bool,
    /// Node name -> running agent.
    pub agents: BTreeMap<String, ProcId>,
    /// The testbed runs a CA (`TestbedConfig::ca`).
    #[serde(default)]
    pub ca_enabled: bool,
    /// The running CA.
    #[serde(default)]
    pub ca: Option<ProcId>,
}

/// A running testbed. Dropping it removes everything it created (unless it was loaded with
/// [`Testbed::load`] or handed over with [`Testbed::keep`]).
pub struct Testbed {
    pub(crate) state: State,
    /// Agents started by this process (node name -> child), reaped on stop.
    pub(crate) children: HashMap<String, Child>,
    /// The CA, when started by this process.
    pub(crate) ca_child: Option<Child>,
    /// Whether Drop tears the testbed down.
    pub(crate) armed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn candidate_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        (u64::from(std::process::id()) << 20) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ nanos;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    format!("nm{:04x}", x & 0xffff)
}

fn check_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 8
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("invalid testbed prefix {prefix:?}: 1..=8 lowercase letters or digits");
    }
    Ok(())
}

/// Reserves a prefix by atomically creating its state directory.
fn reserve(fixed: Option<&str>) -> Result<(String, PathBuf)> {
    std::fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
    if let Some(prefix) = fixed {
        check_prefix(prefix)?;
        let dir = Path::new(STATE_ROOT).join(prefix);
        return match std::fs::create_dir(&dir) {
            Ok(()) => Ok((prefix.to_string(), dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "testbed {prefix} already exists ({}); take it down first (`cargo xtask testbed down`)",
                dir.display()
            ),
            Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        };
    }
    for _ in 0..256 {
        let prefix = candidate_prefix();
        let dir = Path::new(STATE_ROOT).join(&prefix);
        // Skip prefixes a crashed testbed left namespaces or cgroups behind for.
        let cgroup_taken = cgroup::cgroup2_mount().is_ok_and(|m| m.join(&prefix).exists());
        if cgroup_taken || !netns::list_with_prefix(&format!("{prefix}-")).is_empty() {
            continue;
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((prefix, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not find a free testbed prefix under {STATE_ROOT}")
}

impl Testbed {
    /// Builds a testbed: fabric, nodes, the pods of `cfg.manifests`, rendered manifests, and
    /// (with `cfg.agent_bin`) one ready agent per node. On error, everything already created
    /// is removed before returning.
    pub fn up(cfg: TestbedConfig) -> Result<Testbed> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("building a testbed needs root (network namespaces, cgroups)");
        }
        let ipam = Ipam::new(cfg.nodes)?;
        let mut parsed = Vec::new();
        for (file, yaml) in &cfg.manifests {
            render::check_file_name(file)?;
            let docs = render::parse_docs(yaml).with_context(|| format!("manifest {file}"))?;
            parsed.push((file.clone(), docs));
        }
        if let Some(bin) = &cfg.agent_bin
            && !bin.is_file()
        {
            bail!("agent binary {} does not exist", bin.display());
        }
        if cfg.ca && cfg.agent_bin.is_none() {
            bail!("a testbed with a CA needs the mesh-agent binary (agent_bin)");
        }
        let (prefix, state_dir) = reserve(cfg.prefix.as_deref())?;
        let mut tb = Testbed {
            state: State {
                fabric_netns: format!("{prefix}-fabric"),
                prefix,
                name_hint: cfg.name_hint.clone(),
                owner_pid: std::process::id(),
                state_dir,
                cgroup_root: None,
                created_netns: Vec::new(),
                nodes: Vec::new(),
                pods: Vec::new(),
                ipam,
                pod_counter: 0,
                files: BTreeMap::new(),
                agent_bin: cfg.agent_bin.clone(),
                agent_args: cfg.agent_args.clone(),
                detach: cfg.detach,
                agents: BTreeMap::new(),
                ca_enabled: false,
                ca: None,
            },
            children: HashMap::new(),
            ca_child: None,
            armed: true,
        };
        // From here on an error drops `tb`, which tears down whatever exists.
        tb.build(&cfg, parsed)?;
        Ok(tb)
    }

    fn build(&mut self, cfg: &TestbedConfig, parsed: Vec<(String, Vec<Value>)>) -> Result<()> {
        let st = self.state.state_dir.clone();
        for dir in ["manifests", "tmp"] {
            std::fs::create_dir_all(st.join(dir))
                .with_context(|| format!("creating {}", st.join(dir).display()))?;
        }
        let mount = cgroup::cgroup2_mount()?;
        let root = mount.join(&self.state.prefix);
        cgroup::create(&root)?;
        self.state.cgroup_root = Some(root.clone());

        let fabric = self.state.fabric_netns.clone();
        self.create_netns(&fabric)?;
        crate::cmd::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])
            .with_context(|| format!("creating bridge br0 in {fabric}"))?;
        netns::link_up(&fabric, "br0")?;

        for i in 1..=cfg.nodes {
            self.create_node(i, &root)?;
        }
        self.persist()?;
        for (file, docs) in parsed {
            self.apply_docs(&file, docs)?;
        }
        if cfg.ca {
            self.setup_ca()?;
            self.start_ca()?;
        }
        if self.state.agent_bin.is_some() && cfg.start_agents {
            let names = self.node_names();
            for n in &names {
                self.spawn_agent(n)?;
            }
            for n in &names {
                self.wait_agent_ready(n, crate::agent::READY_TIMEOUT)?;
            }
        }
        self.persist()
    }

    pub(crate) fn create_netns(&mut self, name: &str) -> Result<()> {
        netns::create(name).inspect_err(|_| {
            // `ip netns add` may have left the mount point behind.
            if netns::exists(name) {
                self.state.created_netns.push(name.to_string());
            }
        })?;
        self.state.created_netns.push(name.to_string());
        Ok(())
    }

    fn create_node(&mut self, i: usize, cgroup_root: &Path) -> Result<()> {
        let prefix = self.state.prefix.clone();
        let name = ipam::node_name(i);
        let ns = format!("{prefix}-node{i}");
        let fabric = self.state.fabric_netns.clone();
        let node_dir = self.state.state_dir.join(&name);
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        self.create_netns(&ns)?;
        let fab_if = format!("{prefix}n{i}");
        netns::check_ifname(&fab_if)?;
        netns::veth_pair(&fabric, &fab_if, &ns, "eth0")?;
        crate::cmd::ip_in(&fabric, &["link", "set", &fab_if, "master", "br0"])
            .with_context(|| format!("attaching {fab_if} to br0 in {fabric}"))?;
        netns::link_up(&fabric, &fab_if)?;
        let ip = ipam::node_ip(i);
        netns::addr_add(&ns, "eth0", &format!("{ip}/{}", ipam::FABRIC_PREFIX_LEN))?;
        netns::link_up(&ns, "eth0")?;
        // Pods' default gateway: a local address of the node, so the node answers their ARP.
        netns::addr_add(&ns, "lo", &format!("{}/32", ipam::POD_GATEWAY))?;
        netns::sysctls(
            &ns,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv4/conf/all/forwarding", "1"),
            ],
        )?;
        for j in 1..=self.state.ipam.nodes() {
            if j != i {
                let via = ipam::node_ip(j).to_string();
                netns::route_add(&ns, &[&ipam::pod_cidr(j), "via", &via, "dev", "eth0"])?;
            }
        }
        let cg = cgroup_root.join(&name);
        cgroup::create(&cg)?;
        self.state.nodes.push(NodeInfo {
            index: i,
            name: name.clone(),
            ip,
            pod_cidr: ipam::pod_cidr(i),
            netns: ns,
            cgroup: cg,
            admin_socket: node_dir.join("admin.sock"),
            agent_log: node_dir.join("agent.log"),
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/nodemesh-{prefix}-node{i}")),
        });
        Ok(())
    }

    fn create_pod(&mut self, req: &PodRequest) -> Result<()> {
        let key = req.key();
        let i = self.state.ipam.schedule(&key, req.node_name.as_deref())?;
        let node = self
            .state
            .nodes
            .get(i - 1)
            .cloned()
            .ok_or_else(|| anyhow!("pod {key}: node-{i} does not exist"))?;
        let mut cg_name = format!("{}.{}", req.namespace, req.name);
        if cg_name.starts_with("cgroup.") {
            cg_name.insert_str(0, "pod-");
        }
        let cg = node.cgroup.join(&cg_name);
        let ctx = || format!("creating pod {key} on {}", node.name);
        if req.host_network {
            cgroup::create(&cg).with_context(ctx)?;
            self.state.pods.push(PodInfo {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                node: node.name.clone(),
                ip: node.ip,
                netns: node.netns.clone(),
                netns_path: netns::netns_path(&node.netns),
                cgroup: cg,
                host_veth: None,
                host_network: true,
            });
            return Ok(());
        }
        let ip = self.state.ipam.pod_ip(&key, i)?;
        self.state.pod_counter += 1;
        let n = self.state.pod_counter;
        let prefix = self.state.prefix.clone();
        let mut ns = format!("{prefix}-{}.{}", req.namespace, req.name);
        if ns.len() > 200 {
            ns = format!("{prefix}-pod{n}");
        }
        let veth = format!("{prefix}p{n}");
        netns::check_ifname(&veth)?;
        self.create_netns(&ns).with_context(ctx)?;
        let setup = || -> Result<()> {
            let eth = req.interface.as_str();
            netns::veth_pair(&node.netns, &veth, &ns, eth)?;
            netns::sysctls(
                &node.netns,
                &[
                    (&format!("net/ipv4/conf/{veth}/proxy_arp"), "1"),
                    (&format!("net/ipv4/conf/{veth}/forwarding"), "1"),
                ],
            )?;
            netns::link_up(&node.netns, &veth)?;
            netns::route_add(&node.netns, &[&format!("{ip}/32"), "dev", &veth])?;
            netns::addr_add(&ns, eth, &format!("{ip}/32"))?;
            netns::link_up(&ns, eth)?;
            let gw = ipam::POD_GATEWAY.to_string();
            netns::route_add(&ns, &[&gw, "dev", eth, "scope", "link"])?;
            netns::route_add(&ns, &["default", "via", &gw, "dev", eth])?;
            cgroup::create(&cg)?;
            Ok(())
        };
        setup().with_context(ctx)?;
        self.state.pods.push(PodInfo {
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            node: node.name.clone(),
            ip,
            netns_path: netns::netns_path(&ns),
            netns: ns,
            cgroup: cg,
            host_veth: Some(veth),
            host_network: false,
        });
        Ok(())
    }

    fn apply_docs(&mut self, file: &str, docs: Vec<Value>) -> Result<()> {
        let reqs = render::pod_requests(&docs).with_context(|| format!("manifest {file}"))?;
        for req in &reqs {
            let key = req.key();
            if let Some((other, _)) = self
                .state
                .files
                .iter()
                .find(|(f, keys)| f.as_str() != file && keys.contains(&key))
            {
                bail!("manifest {file}: pod {key} is already defined in manifest {other}");
            }
        }
        let mut placements = BTreeMap::new();
        for req in &reqs {
            let key = req.key();
            if !self.state.pods.iter().any(|p| p.key() == key) {
                self.create_pod(req)
                    .with_context(|| format!("manifest {file}"))?;
            }
            let pod = self
                .state
                .pods
                .iter()
                .find(|p| p.key() == key)
                .ok_or_else(|| anyhow!("pod {key} vanished"))?;
            let node = self.node(&pod.node)?;
            placements.insert(
                key,
                Placement {
                    node_name: pod.node.clone(),
                    node_ip: node.ip,
                    pod_ip: pod.ip,
                    netns_path: pod.netns_path.to_string_lossy().into_owned(),
                },
            );
        }
        let text = render::render(docs, &placements, &mut self.state.ipam)
            .with_context(|| format!("rendering manifest {file}"))?;
        self.write_manifest(file, &text)?;
        self.state
            .files
            .insert(file.to_string(), reqs.iter().map(PodRequest::key).collect());
        Ok(())
    }

    /// Writes `<state>/manifests/<file>` atomically: the agent never sees a partial file (the
    /// temporary file lives outside the manifests directory).
    fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        let dir = self.manifests_dir();
        let tmp_dir = self.state.state_dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir)
            .with_context(|| format!("creating {}", tmp_dir.display()))?;
        let tmp = tmp_dir.join(format!("{file}.{}", std::process::id()));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = dir.join(file);
        std::fs::rename(&tmp, &dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
    }

    /// Renders (again) one manifest file at runtime. Pods that already exist (same
    /// namespace/name) keep their network namespace, IP and node; new pods are created.
    /// Pods that disappear from the file keep their namespace until `down`.
    pub fn apply(&mut self, file_name: &str, yaml: &str) -> Result<()> {
        render::check_file_name(file_name)?;
        let docs = render::parse_docs(yaml).with_context(|| format!("manifest {file_name}"))?;
        self.apply_docs(file_name, docs)?;
        self.persist()
    }

    /// Removes one rendered manifest file (the agent sees its objects go away). The pods'
    /// network namespaces stay until `down`.
    pub fn remove_file(&mut self, file_name: &str) -> Result<()> {
        render::check_file_name(file_name)?;
        let path = self.manifests_dir().join(file_name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        self.state.files.remove(file_name);
        self.persist()
    }
}
