//! What the container runtime hands the plugin: the `CNI_*` environment and the network
//! configuration on stdin (with `prevResult` when chained), parsed strictly. Errors are
//! [`CniError`]s with the spec's codes, naming the variable or field at fault.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

/// CNI spec versions this plugin speaks (a chained plugin passes results through, so every
/// version with `prevResult` works the same).
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];
/// Plugin `timeout` when the config has none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Error codes of the CNI spec (and ours from 100 on).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent answered that the pod could not be enrolled (or is not as ADD left it).
    pub const NOT_ENROLLED: u32 = 100;
}

/// A CNI error result: printed as JSON on stdout, exit status 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
        }
    }

    /// The spec's error document.
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        })
        .to_string()
    }
}

/// The CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
    /// CNI 1.1: nothing for this plugin to collect (the agent drops sandboxes whose
    /// namespace is gone by itself).
    Gc,
    /// CNI 1.1: ready to serve ADD. Always true: ADD itself decides, fail-closed.
    Status,
}

/// The `CNI_*` environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: CniCommand,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// Reads the environment through `get`; what each command requires must be there.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let var = |name: &str| get(name).unwrap_or_default();
        let command = match var("CNI_COMMAND").as_str() {
            "ADD" => CniCommand::Add,
            "DEL" => CniCommand::Del,
            "CHECK" => CniCommand::Check,
            "VERSION" => CniCommand::Version,
            "GC" => CniCommand::Gc,
            "STATUS" => CniCommand::Status,
            "" => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not set: nodemesh-cni is a CNI plugin, run by the container \
                     runtime (`mesh-agent cni install` puts it in place)",
                ));
            }
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, VERSION, GC or STATUS"),
                ));
            }
        };
        let env = CniEnv {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_cni_args(&var("CNI_ARGS"))?,
        };
        let needs = match command {
            CniCommand::Add | CniCommand::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"][..]
            }
            CniCommand::Del => &["CNI_CONTAINERID", "CNI_IFNAME"][..],
            _ => &[][..],
        };
        for name in needs {
            if var(name).is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not set (CNI_COMMAND {})", var("CNI_COMMAND")),
                ));
            }
        }
        Ok(env)
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS`.
    pub fn pod(&self) -> Result<(&str, &str), CniError> {
        let get = |k: &str| {
            self.args
                .get(k)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_ENV,
                        format!(
                            "CNI_ARGS has no {k}: nodemesh-cni serves Kubernetes pods (the \
                             kubelet's runtime passes K8S_POD_NAMESPACE and K8S_POD_NAME)"
                        ),
                    )
                })
        };
        Ok((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (empty: none).
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        if k.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} has an empty key"),
            ));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// The plugin's network configuration, as the runtime passes it on stdin.
#[derive(Debug)]
pub struct NetConf {
    /// The agent's CNI socket (`agentSocket`).
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent (`timeout`, e.g. `"30s"`).
    pub timeout: Duration,
    /// Namespaces whose pods start when the agent is unreachable and its namespace list does
    /// not say they are enrolled (`excludeNamespaces`).
    pub exclude_namespaces: Vec<String>,
    /// The previous plugin's result, passed through unchanged.
    pub prev_result: Option<Box<RawValue>>,
}

/// The fields this plugin reads plus those the spec and runtimes put in every plugin's
/// config; anything else is a typo, refused rather than silently defaulted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConf {
    cni_version: String,
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    name: Option<String>,
    #[serde(rename = "type")]
    type_: String,
    #[serde(default)]
    agent_socket: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
    #[serde(default)]
    prev_result: Option<Box<RawValue>>,
    // Set by runtimes and by the spec for every plugin; unused here.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    capabilities: Option<Box<RawValue>>,
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    runtime_config: Option<Box<RawValue>>,
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    args: Option<Box<RawValue>>,
}

/// The `cniVersion` of a config, even one that is otherwise wrong (for the error document).
pub fn version_of(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        v: String,
    }
    serde_json::from_slice::<V>(stdin)
        .map(|v| v.v)
        .unwrap_or_else(|_| "1.0.0".into())
}

/// Parses and checks the network configuration.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
        let code = if e.to_string().contains("unknown field") {
            code::UNSUPPORTED_FIELD
        } else {
            code::DECODE
        };
        CniError::new(code, format!("network configuration on stdin: {e}"))
    })?;
    if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported (supported: {})",
                raw.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if raw.type_ != super::PLUGIN_TYPE {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "field type: {:?}, expected {:?}",
                raw.type_,
                super::PLUGIN_TYPE
            ),
        ));
    }
    let agent_socket = PathBuf::from(
        raw.agent_socket
            .unwrap_or_else(|| super::DEFAULT_SOCKET.to_owned()),
    );
    if !agent_socket.is_absolute() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "field agentSocket: {:?} is not an absolute path",
                agent_socket.display()
            ),
        ));
    }
    let timeout = match raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => crate::app::parse_duration(&t)
            .ok()
            .filter(|d| {
                *d >= Duration::from_secs(1)
                    && d.as_millis() <= u128::from(super::protocol::MAX_TIMEOUT_MS)
            })
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("field timeout: {t:?} is not a duration from 1s to 5m (e.g. \"30s\")"),
                )
            })?,
    };
    let exclude_namespaces = raw.exclude_namespaces.unwrap_or_default();
    for (i, ns) in exclude_namespaces.iter().enumerate() {
        super::protocol::dns_label(ns).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("field excludeNamespaces[{i}]: {e}"),
            )
        })?;
    }
    Ok(NetConf {
        agent_socket,
        timeout,
        exclude_namespaces,
        prev_result: raw.prev_result,
    })
}

/// The pod's IPv4 addresses in a previous result: those on an interface inside the sandbox
/// (`sandbox` set), or all of them when the result names no interfaces.
pub fn pod_ips(prev: &RawValue) -> Result<Vec<Ipv4Addr>, CniError> {
    #[derive(Deserialize)]
    struct Result {
        #[serde(default)]
        interfaces: Vec<Interface>,
        #[serde(default)]
        ips: Vec<Ip>,
    }
    #[derive(Deserialize)]
    struct Interface {
        #[serde(default)]
        sandbox: Option<String>,
    }
    #[derive(Deserialize)]
    struct Ip {
        address: String,
        #[serde(default)]
        interface: Option<usize>,
    }
    let r: Result = serde_json::from_str(prev.get())
        .map_err(|e| CniError::new(code::DECODE, format!("field prevResult: {e}")))?;
    let in_sandbox = |i: &Ip| match i.interface {
        Some(idx) => r
            .interfaces
            .get(idx)
            .is_some_and(|f| f.sandbox.as_deref().is_some_and(|s| !s.is_empty())),
        None => true,
    };
    let mut out = Vec::new();
    for (n, ip) in r.ips.iter().enumerate() {
        let addr = ip.address.split('/').next().unwrap_or_default();
        if addr.contains(':') || !in_sandbox(ip) {
            continue;
        }
        let parsed = addr.parse().map_err(|_| {
            CniError::new(
                code::DECODE,
                format!(
                    "field prevResult.ips[{n}].address: {:?} is not an address",
                    ip.address
                ),
            )
        })?;
        out.push(parsed);
    }
    Ok(out)
}
