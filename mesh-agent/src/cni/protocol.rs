//! What the CNI plugin and the agent say to each other over the CNI socket: one JSON request
//! line, one JSON reply line, then the connection closes.
//!
//! The agent runs privileged and the socket is its door: everything in a request is treated as
//! hostile until [`Request::validate`] accepted it (sizes, names, the network namespace path).

use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes a request or reply line may have, newline included. A request is a few hundred.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Version of this protocol; the agent refuses others with a message saying both.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest wait a request may ask for.
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Pod IPs a request may carry (from the interface plugin's result).
const MAX_IPS: usize = 16;

/// The CNI command the request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A new pod sandbox: enroll it, answer once it is enrolled or known not to be meshed.
    Add,
    /// The sandbox goes away: unenroll it.
    Del,
    /// Is the pod as ADD left it?
    Check,
}

/// One request from the plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `CNI_CONTAINERID`: the pod sandbox.
    pub container_id: String,
    /// `CNI_NETNS`; may be empty on DEL (the runtime may have torn it down already).
    #[serde(default)]
    pub netns: String,
    /// The pod's IPv4 addresses from the previous plugin's result (ADD).
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
    /// How long the plugin waits for the reply; the agent answers before.
    pub timeout_ms: u64,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase", deny_unknown_fields)]
pub enum Reply {
    /// ADD/CHECK: capture is in place for the pod.
    #[serde(rename_all = "camelCase")]
    Enrolled { netns_cookie: u64 },
    /// ADD/CHECK: the pod is not in the mesh (namespace not enrolled, opted out, hostNetwork).
    NotMeshed { reason: String },
    /// DEL done: `known` says whether the agent had this sandbox.
    Deleted { known: bool },
    /// The request could not be served; the plugin fails with this message.
    Failed { message: String },
}

/// A request that passed [`Request::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Valid {
    pub command: Command,
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    /// Required for ADD and CHECK; `None` on a DEL without one.
    pub netns: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
    pub timeout: std::time::Duration,
}

impl Request {
    /// Checks every field; the error names the field and the value at fault.
    pub fn validate(&self) -> Result<Valid, String> {
        if self.version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} (this agent speaks {PROTOCOL_VERSION}): the nodemesh-cni \
                 binary and the agent differ; reinstall the plugin from this agent",
                self.version
            ));
        }
        dns_label(&self.pod_namespace).map_err(|e| format!("podNamespace: {e}"))?;
        dns_subdomain(&self.pod_name).map_err(|e| format!("podName: {e}"))?;
        container_id(&self.container_id).map_err(|e| format!("containerId: {e}"))?;
        let netns = match (self.command, self.netns.as_str()) {
            (Command::Del, "") => None,
            (_, "") => return Err("netns: empty; ADD and CHECK need CNI_NETNS".into()),
            (_, path) => Some(netns_path(path).map_err(|e| format!("netns: {e}"))?),
        };
        if self.ips.len() > MAX_IPS {
            return Err(format!(
                "ips: {} addresses, at most {MAX_IPS}",
                self.ips.len()
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "timeoutMs: {} is not within 1..={MAX_TIMEOUT_MS}",
                self.timeout_ms
            ));
        }
        Ok(Valid {
            command: self.command,
            namespace: self.pod_namespace.clone(),
            name: self.pod_name.clone(),
            container_id: self.container_id.clone(),
            netns,
            ip: self.ips.first().copied(),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
        })
    }
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a namespace name (lowercase RFC 1123 label, at most 63 characters)",
            clip(s)
        ))
    }
}

/// A Kubernetes pod name: an RFC 1123 subdomain.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() <= 253 && s.split('.').all(|l| dns_label(l).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a pod name (lowercase RFC 1123 subdomain, at most 253 characters)",
            clip(s)
        ))
    }
}

/// A container (sandbox) ID as runtimes make them: letters, digits, `_.-`, at most 256.
pub fn container_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a container ID (letters, digits, `_.-`, at most 256 characters)",
            clip(s)
        ))
    }
}

/// Where the agent accepts a pod's network namespace from: `/proc/<pid>/ns/net`, or a name
/// pinned by the runtime under `/var/run/netns` or `/run/netns` (containerd, CRI-O). The path
/// must be written in that canonical form: absolute, no `.`/`..`, no repeated or trailing `/`.
pub fn netns_path(s: &str) -> Result<PathBuf, String> {
    const DIRS: [&str; 2] = ["/var/run/netns/", "/run/netns/"];
    let bad = |why: &str| {
        Err(format!(
            "{:?} {why}; expected /proc/<pid>/ns/net, /var/run/netns/<name> or /run/netns/<name>",
            clip(s)
        ))
    };
    let path = Path::new(s);
    if s.len() > 256 || s.contains('\0') {
        return bad("is too long or contains NUL");
    }
    if !path.is_absolute() || s.ends_with('/') || s.contains("//") {
        return bad("is not a canonical absolute path");
    }
    if path
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return bad("contains `.` or `..`");
    }
    if let Some(rest) = s.strip_prefix("/proc/")
        && let Some(pid) = rest.strip_suffix("/ns/net")
    {
        let digits = !pid.is_empty() && pid.len() <= 10 && pid.bytes().all(|b| b.is_ascii_digit());
        if digits && !pid.starts_with('0') {
            return Ok(path.to_path_buf());
        }
        return bad("names no process ID");
    }
    for dir in DIRS {
        if let Some(name) = s.strip_prefix(dir) {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if ok && name != "." && name != ".." {
                return Ok(path.to_path_buf());
            }
            return bad("is not a plain name in a netns directory");
        }
    }
    bad("is not where runtimes keep network namespaces")
}

/// At most 80 characters of a hostile value, for messages.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// One line of at most [`MAX_MESSAGE`] bytes, parsed as JSON.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, String> {
    if line.len() > MAX_MESSAGE {
        return Err(format!(
            "message of {} bytes, at most {MAX_MESSAGE}",
            line.len()
        ));
    }
    serde_json::from_slice(line).map_err(|e| format!("not a valid message: {e}"))
}

/// `v` as one JSON line.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty line would be refused anyway.
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request {
            version: PROTOCOL_VERSION,
            command: Command::Add,
            pod_namespace: "shop".into(),
            pod_name: "web-7d9f.x".into(),
            container_id: "0123abcdef".into(),
            netns: "/var/run/netns/cni-1234-abcd".into(),
            ips: vec![Ipv4Addr::new(10, 0, 0, 5)],
            timeout_ms: 10_000,
        }
    }

    #[test]
    fn a_good_request_validates() {
        let v = add().validate().expect("valid");
        assert_eq!(
            v.netns.as_deref(),
            Some(Path::new("/var/run/netns/cni-1234-abcd"))
        );
        assert_eq!(v.ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        let line = encode(&add());
        assert_eq!(decode::<Request>(&line[..line.len() - 1]), Ok(add()));
    }

    #[test]
    fn netns_paths() {
        for ok in [
            "/proc/1234/ns/net",
            "/var/run/netns/cni-a_b.c",
            "/run/netns/x",
        ] {
            assert!(netns_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "relative/netns",
            "/var/run/netns/../../etc/passwd",
            "/var/run/netns/a/b",
            "/var/run/netns/",
            "/var/run/netns/..",
            "/proc/self/ns/net",
            "/proc/0123/ns/net",
            "/proc/1/ns/mnt",
            "/proc/1/ns/net/",
            "//var/run/netns/x",
            "/var/run/netns//x",
            "/etc/passwd",
            "/tmp/netns/x",
        ] {
            let e = netns_path(bad).expect_err(bad);
            assert!(e.contains("expected /proc/<pid>/ns/net"), "{e}");
        }
    }

    #[test]
    fn fields_are_checked_and_named() {
        type Change = fn(&mut Request);
        let cases: [(Change, &str); 8] = [
            (|r| r.version = 2, "protocol version 2"),
            (
                |r| r.pod_namespace = "Shop".into(),
                "podNamespace: \"Shop\"",
            ),
            (|r| r.pod_name = "-x".into(), "podName"),
            (|r| r.container_id = "a/b".into(), "containerId"),
            (|r| r.netns = String::new(), "netns: empty"),
            (|r| r.netns = "/etc/shadow".into(), "netns: \"/etc/shadow\""),
            (|r| r.ips = vec![Ipv4Addr::LOCALHOST; 17], "ips: 17"),
            (|r| r.timeout_ms = 0, "timeoutMs: 0"),
        ];
        for (change, want) in cases {
            let mut r = add();
            change(&mut r);
            let e = r.validate().expect_err(want);
            assert!(e.contains(want), "{e} lacks {want}");
        }
        let mut del = add();
        del.command = Command::Del;
        del.netns = String::new();
        assert_eq!(del.validate().expect("DEL without netns").netns, None);
    }

    #[test]
    fn oversized_and_unknown_messages_are_refused() {
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert!(
            decode::<Request>(&big)
                .expect_err("big")
                .contains("at most")
        );
        let extra = br#"{"version":1,"command":"ADD","podNamespace":"a","podName":"b",
            "containerId":"c","timeoutMs":1,"hostPath":"/"}"#;
        assert!(
            decode::<Request>(extra)
                .expect_err("unknown")
                .contains("hostPath")
        );
        let reply = encode(&Reply::Enrolled { netns_cookie: 7 });
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "{\"result\":\"enrolled\",\"netnsCookie\":7}\n"
        );
    }
}
