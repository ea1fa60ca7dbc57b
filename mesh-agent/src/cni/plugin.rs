//! `nodemesh-cni`: the plugin half. The container runtime runs it after the cluster's
//! interface plugin (it is chained in the conflist): ADD asks the agent to enroll the pod and
//! waits for the answer, then prints the previous result unchanged; DEL tells the agent the
//! sandbox is gone and always succeeds; CHECK asks whether the pod is still as ADD left it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::conf::{self, CniCommand, CniEnv, CniError, NetConf, code};
use super::namespaces::{Known, NamespaceCache};
use super::protocol::{self, Command, PROTOCOL_VERSION, Reply, Request};

/// Largest network configuration read from stdin.
const MAX_STDIN: u64 = 1 << 20;
/// How much longer than its own deadline the plugin waits for the agent's reply (the agent
/// answers before the deadline, with the reason it is still waiting).
const REPLY_SLACK: Duration = Duration::from_secs(2);

/// Why a call to the agent failed.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    /// No connection could be made: the agent is not there. The fail-closed rule decides.
    Unreachable(String),
    /// Connected, but no usable reply: fail (and let the runtime retry).
    Failed(String),
}

/// The way to the agent (a unix socket; a fake in tests).
pub trait AgentLink {
    fn call(&self, socket: &Path, req: &Request, wait: Duration) -> Result<Reply, CallError>;
}

/// The real link: one request line, one reply line over the agent's CNI socket.
pub struct SocketLink;

impl AgentLink for SocketLink {
    fn call(&self, socket: &Path, req: &Request, wait: Duration) -> Result<Reply, CallError> {
        let mut s = UnixStream::connect(socket)
            .map_err(|e| CallError::Unreachable(format!("{}: {e}", socket.display())))?;
        let failed = |what: &str, e: std::io::Error| {
            CallError::Failed(format!("{} ({what}): {e}", socket.display()))
        };
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| failed("setting a timeout", e))?;
        s.set_read_timeout(Some(wait))
            .map_err(|e| failed("setting a timeout", e))?;
        s.write_all(&protocol::encode(req))
            .map_err(|e| failed("sending the request", e))?;
        let mut line = Vec::new();
        BufReader::new(s)
            .take(protocol::MAX_MESSAGE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| failed(&format!("waiting up to {wait:?} for the reply"), e))?;
        if line.last() != Some(&b'\n') {
            return Err(CallError::Failed(format!(
                "{}: the agent closed the connection without a complete reply",
                socket.display()
            )));
        }
        line.pop();
        protocol::decode(&line).map_err(|e| CallError::Failed(format!("{}: {e}", socket.display())))
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Log lines for the runtime's log.
    pub stderr: String,
    pub success: bool,
}

impl Outcome {
    fn ok(stdout: impl Into<String>, log: impl Into<String>) -> Outcome {
        Outcome {
            stdout: stdout.into(),
            stderr: log.into(),
            success: true,
        }
    }

    fn error(cni_version: &str, e: &CniError) -> Outcome {
        Outcome {
            stdout: e.to_json(cni_version),
            stderr: format!("nodemesh-cni: error {}: {}", e.code, e.msg),
            success: false,
        }
    }
}

/// Runs the plugin as the runtime invoked it (environment and stdin of this process).
pub fn main() -> ExitCode {
    let env = CniEnv::parse(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let out = match read {
        Err(e) => Outcome::error(
            "1.0.0",
            &CniError::new(
                code::IO,
                format!("reading the network configuration from stdin: {e}"),
            ),
        ),
        Ok(n) if n as u64 > MAX_STDIN => Outcome::error(
            "1.0.0",
            &CniError::new(
                code::DECODE,
                format!("network configuration larger than {MAX_STDIN} bytes"),
            ),
        ),
        Ok(_) => run(env, &stdin, &SocketLink),
    };
    print!("{}", out.stdout);
    let _ = std::io::stdout().flush();
    if !out.stderr.is_empty() {
        eprintln!("{}", out.stderr);
    }
    if out.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One invocation: the environment as parsed, the bytes on stdin, the way to the agent.
pub fn run(env: Result<CniEnv, CniError>, stdin: &[u8], agent: &dyn AgentLink) -> Outcome {
    let version = conf::version_of(stdin);
    let result = env.and_then(|env| match env.command {
        CniCommand::Version => Ok(Outcome::ok(version_doc(&version), "")),
        CniCommand::Gc | CniCommand::Status => conf::parse_conf(stdin).map(|_| Outcome::ok("", "")),
        CniCommand::Add => add(&env, &conf::parse_conf(stdin)?, agent),
        CniCommand::Del => Ok(del(&env, conf::parse_conf(stdin), agent)),
        CniCommand::Check => check(&env, &conf::parse_conf(stdin)?, agent),
    });
    result.unwrap_or_else(|e| Outcome::error(&version, &e))
}

fn version_doc(version: &str) -> String {
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": conf::SUPPORTED_VERSIONS,
    })
    .to_string()
}

fn request(env: &CniEnv, conf: &NetConf, command: Command) -> Result<Request, CniError> {
    let (namespace, name) = env.pod()?;
    let ips = match (&conf.prev_result, command) {
        (Some(prev), Command::Add) => conf::pod_ips(prev)?,
        _ => Vec::new(),
    };
    Ok(Request {
        version: PROTOCOL_VERSION,
        command,
        pod_namespace: namespace.to_owned(),
        pod_name: name.to_owned(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ips,
        timeout_ms: u64::try_from(conf.timeout.as_millis()).unwrap_or(u64::MAX),
    })
}

fn add(env: &CniEnv, conf: &NetConf, agent: &dyn AgentLink) -> Result<Outcome, CniError> {
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: nodemesh-cni is a chained plugin; list it after the cluster's \
             interface plugin in the conflist's plugins",
        ));
    };
    let req = request(env, conf, Command::Add)?;
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    match agent.call(&conf.agent_socket, &req, conf.timeout + REPLY_SLACK) {
        Ok(Reply::Enrolled { netns_cookie }) => Ok(Outcome::ok(
            prev.get(),
            format!("nodemesh-cni: pod {pod} enrolled (netns cookie {netns_cookie})"),
        )),
        Ok(Reply::NotMeshed { reason }) => Ok(Outcome::ok(
            prev.get(),
            format!("nodemesh-cni: pod {pod} is not meshed: {reason}"),
        )),
        Ok(Reply::Failed { message }) => Err(CniError::new(
            code::NOT_ENROLLED,
            format!("nodemesh agent could not enroll pod {pod}: {message}"),
        )),
        Ok(other) => Err(unexpected(conf, &other)),
        Err(CallError::Failed(why)) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("no answer from the nodemesh agent about pod {pod}: {why}"),
        )),
        Err(CallError::Unreachable(why)) => agent_absent(conf, &req.pod_namespace, &pod, &why)
            .map(|log| Outcome::ok(prev.get(), log)),
    }
}

/// The fail-closed rule (see the module `cni`): with the agent unreachable, a pod starts only
/// if the agent's last namespace list says its namespace is not enrolled, or the list cannot
/// tell and the namespace is in `excludeNamespaces`.
fn agent_absent(conf: &NetConf, namespace: &str, pod: &str, why: &str) -> Result<String, CniError> {
    let path = super::namespaces_file(&conf.agent_socket);
    let excluded = conf.exclude_namespaces.iter().any(|n| n == namespace);
    let refuse = |reason: String| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "nodemesh agent unreachable at {why}; pod {pod} {reason}: not starting it \
                 outside the mesh (fail closed). It starts once the node's agent runs \
                 (kubectl -n nodemesh-system get pods -l app.kubernetes.io/name=nodemesh-agent \
                 -o wide)"
            ),
        )
    };
    let passing = |reason: String| {
        format!("nodemesh-cni: agent unreachable at {why}; pod {pod} starts unmeshed: {reason}")
    };
    match NamespaceCache::read(&path) {
        Ok(cache) => match cache.lookup(namespace) {
            Known::NotEnrolled => Ok(passing(format!(
                "namespace {namespace} is not enrolled (per {}, written {})",
                path.display(),
                cache.written
            ))),
            Known::Enrolled => Err(refuse(format!(
                "is in namespace {namespace}, enrolled in the mesh (per {}, written {})",
                path.display(),
                cache.written
            ))),
            Known::Unknown if excluded => Ok(passing(format!(
                "namespace {namespace} is in excludeNamespaces"
            ))),
            Known::Unknown => Err(refuse(format!(
                "is in namespace {namespace}, which the agent's last namespace list ({}, \
                 written {}) does not have, so it may be enrolled",
                path.display(),
                cache.written
            ))),
        },
        Err(_) if excluded => Ok(passing(format!(
            "namespace {namespace} is in excludeNamespaces"
        ))),
        Err(e) => Err(refuse(format!(
            "is in namespace {namespace}, which may be enrolled: the agent's namespace list \
             cannot be read ({e})"
        ))),
    }
}

fn del(env: &CniEnv, conf: Result<NetConf, CniError>, agent: &dyn AgentLink) -> Outcome {
    // DEL must succeed whatever is missing: the runtime retries a failed DEL forever.
    let conf = match conf {
        Ok(c) => c,
        Err(e) => {
            return Outcome::ok(
                "",
                format!(
                    "nodemesh-cni: DEL with a bad config ({}), nothing to do",
                    e.msg
                ),
            );
        }
    };
    let req = match request(env, &conf, Command::Del) {
        Ok(r) => r,
        Err(e) => return Outcome::ok("", format!("nodemesh-cni: DEL: {}; nothing to do", e.msg)),
    };
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    let log = match agent.call(&conf.agent_socket, &req, conf.timeout + REPLY_SLACK) {
        Ok(Reply::Deleted { known: true }) => format!("nodemesh-cni: pod {pod} unenrolled"),
        Ok(Reply::Deleted { known: false }) => {
            format!(
                "nodemesh-cni: the agent had no sandbox {} of pod {pod}",
                req.container_id
            )
        }
        Ok(other) => format!("nodemesh-cni: DEL of pod {pod}: unexpected reply {other:?}"),
        Err(CallError::Unreachable(why) | CallError::Failed(why)) => format!(
            "nodemesh-cni: DEL of pod {pod}: agent unreachable ({why}); it forgets sandboxes \
             whose network namespace is gone by itself"
        ),
    };
    Outcome::ok("", log)
}

fn check(env: &CniEnv, conf: &NetConf, agent: &dyn AgentLink) -> Result<Outcome, CniError> {
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK without prevResult: nodemesh-cni is a chained plugin",
        ));
    }
    let req = request(env, conf, Command::Check)?;
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    match agent.call(&conf.agent_socket, &req, conf.timeout + REPLY_SLACK) {
        Ok(Reply::Enrolled { .. } | Reply::NotMeshed { .. }) => Ok(Outcome::ok("", "")),
        Ok(Reply::Failed { message }) => Err(CniError::new(
            code::NOT_ENROLLED,
            format!("pod {pod} is not as ADD left it: {message}"),
        )),
        Ok(other) => Err(unexpected(conf, &other)),
        Err(CallError::Failed(why)) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("no answer from the nodemesh agent about pod {pod}: {why}"),
        )),
        Err(CallError::Unreachable(why)) => {
            agent_absent(conf, &req.pod_namespace, &pod, &why).map(|log| Outcome::ok("", log))
        }
    }
}

fn unexpected(conf: &NetConf, reply: &Reply) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!(
            "unexpected reply from the nodemesh agent at {}: {reply:?}",
            conf.agent_socket.display()
        ),
    )
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
