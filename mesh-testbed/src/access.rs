//! Looking things up in a testbed and running commands in its pods and nodes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

use crate::netns;
use crate::process::{PodProcess, enter_cgroup_and_netns};
use crate::testbed::{NodeInfo, PodInfo, Testbed};

impl Testbed {
    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    pub fn state_dir(&self) -> &Path {
        &self.state.state_dir
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.state.state_dir.join("manifests")
    }

    /// `<cgroup2 mount>/<prefix>`.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.state.cgroup_root.as_deref()
    }

    pub fn fabric_netns(&self) -> &str {
        &self.state.fabric_netns
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.state.nodes
    }

    pub fn node_names(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A node by name (`node-1`).
    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in testbed {}", self.state.prefix))
    }

    pub fn pods(&self) -> &[PodInfo] {
        &self.state.pods
    }

    /// A pod by `namespace/name`, or by bare `name` when that is unambiguous.
    pub fn pod(&self, pod: &str) -> Result<&PodInfo> {
        let found: Vec<&PodInfo> = match pod.split_once('/') {
            Some((ns, name)) => self
                .state
                .pods
                .iter()
                .filter(|p| p.namespace == ns && p.name == name)
                .collect(),
            None => self.state.pods.iter().filter(|p| p.name == pod).collect(),
        };
        match found.as_slice() {
            [p] => Ok(p),
            [] => bail!("no pod {pod:?} in testbed {}", self.state.prefix),
            many => bail!(
                "pod name {pod:?} is ambiguous ({}); use namespace/name",
                many.iter().map(|p| p.key()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn pod_ip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr> {
        Ok(self.pod(&format!("{namespace}/{name}"))?.ip)
    }

    /// The ClusterIP of Service `namespace/name`.
    pub fn service_ip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr> {
        self.state
            .ipam
            .lookup_service(namespace, name)
            .ok_or_else(|| {
                anyhow!(
                    "no service {namespace}/{name} in testbed {}",
                    self.state.prefix
                )
            })
    }

    /// All services with a ClusterIP as ("namespace/name", ip).
    pub fn services(&self) -> Vec<(String, Ipv4Addr)> {
        self.state
            .ipam
            .services()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// A command that runs inside the pod: in the child it first joins the pod's cgroup, then
    /// its network namespace (the mount namespace stays the host's).
    pub fn pod_command(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let p = self.pod(pod)?;
        let mut cmd = Command::new(program);
        enter_cgroup_and_netns(&mut cmd, &p.cgroup, &p.netns, false)
            .with_context(|| format!("preparing a command for pod {}", p.key()))?;
        Ok(cmd)
    }

    /// Runs `f` on a short-lived thread inside the pod's network namespace (not its cgroup),
    /// e.g. to use std sockets from the test process as if from the pod.
    pub fn in_pod_netns<T, F>(&self, pod: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        netns::in_netns(&self.pod(pod)?.netns, f)
    }

    /// A command that runs in a node's network namespace and cgroup.
    pub fn node_command(
        &self,
        node: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let n = self.node(node)?;
        let mut cmd = Command::new(program);
        enter_cgroup_and_netns(&mut cmd, &n.cgroup, &n.netns, false)
            .with_context(|| format!("preparing a command for node {node}"))?;
        Ok(cmd)
    }

    /// Starts `program args...` in a pod with stdout piped; the returned guard stops it on
    /// drop. Use [`PodProcess::wait_for_line`] to wait for e.g. `listening`.
    pub fn spawn_in_pod<I, S>(
        &self,
        pod: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: I,
    ) -> Result<PodProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let what = format!("{} in pod {pod}", Path::new(program.as_ref()).display());
        let mut cmd = self.pod_command(pod, program)?;
        cmd.args(args);
        PodProcess::spawn(cmd, &what)
    }
}
