//! Named network namespaces (`ip netns`), veth links, addresses, routes and per-namespace
//! sysctls.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::{ip, ip_in};

/// Directory where `ip netns add` bind-mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Path of a named network namespace (what the `nodemesh.io/netns` annotation holds).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Creates a named network namespace and brings its loopback up.
pub fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).with_context(|| format!("creating network namespace {name}"))?;
    ip_in(name, &["link", "set", "lo", "up"])
        .with_context(|| format!("bringing lo up in network namespace {name}"))?;
    Ok(())
}

/// Deletes a named network namespace (and with it every interface inside it, which also
/// removes the peer end of its veth pairs). Missing namespaces are not an error.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).with_context(|| format!("deleting network namespace {name}"))?;
    Ok(())
}

/// Names of all named network namespaces that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Creates a veth pair with one end `a_name` in namespace `a_ns` and the other end `b_name`
/// in namespace `b_ns`, without ever placing either end in the host namespace.
pub fn veth_pair(a_ns: &str, a_name: &str, b_ns: &str, b_name: &str) -> Result<()> {
    ip_in(
        a_ns,
        &[
            "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b_ns,
        ],
    )
    .with_context(|| format!("creating veth {a_ns}/{a_name} <-> {b_ns}/{b_name}"))?;
    Ok(())
}

pub fn link_up(ns: &str, dev: &str) -> Result<()> {
    ip_in(ns, &["link", "set", dev, "up"]).with_context(|| format!("bringing {ns}/{dev} up"))?;
    Ok(())
}

pub fn addr_add(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    ip_in(ns, &["addr", "add", cidr, "dev", dev])
        .with_context(|| format!("adding address {cidr} to {ns}/{dev}"))?;
    Ok(())
}

/// `ip -n <ns> route add <args...>`.
pub fn route_add(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["route", "add"];
    full.extend_from_slice(args);
    ip_in(ns, &full).with_context(|| format!("adding route `{}` in {ns}", args.join(" ")))?;
    Ok(())
}

/// Runs `f` on a short-lived thread that has joined network namespace `ns` (only that thread
/// changes namespace; the rest of the process is untouched). `/proc/sys/net` seen from that
/// thread belongs to `ns`.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    let ns_name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<T> {
            // SAFETY: setns on this thread only; the fd is valid for the duration of the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into network namespace {ns_name}"));
            }
            f()
        })
        .context("spawning a thread to enter a network namespace")?;
    handle
        .join()
        .map_err(|_| anyhow!("thread working in network namespace {ns} panicked"))?
}

/// Sets sysctls (`key` relative to /proc/sys, with `/` separators, e.g.
/// `net/ipv4/conf/eth0/proxy_arp`) inside network namespace `ns`.
pub fn sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let owned: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    let ns_name = ns.to_string();
    in_netns(ns, move || {
        for (key, value) in &owned {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).with_context(|| {
                format!("setting sysctl {key}={value} in network namespace {ns_name}")
            })?;
        }
        Ok(())
    })
}

/// Reads a sysctl inside network namespace `ns`.
pub fn sysctl_get(ns: &str, key: &str) -> Result<String> {
    let key = key.to_string();
    let ns_name = ns.to_string();
    in_netns(ns, move || {
        let path = Path::new("/proc/sys").join(&key);
        let v = std::fs::read_to_string(&path)
            .with_context(|| format!("reading sysctl {key} in network namespace {ns_name}"))?;
        Ok(v.trim().to_string())
    })
}

/// Checks that an interface name fits the kernel's limit (IFNAMSIZ - 1).
pub fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(' ') {
        bail!("invalid interface name {name:?} (1..=15 characters, no '/' or spaces)");
    }
    Ok(())
}
