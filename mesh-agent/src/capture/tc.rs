//! Inbound capture attachment: the `inbound_capture` tc program on each enrolled pod's
//! interface, inside the pod's network namespace, as a TCX link pinned under the agent's
//! bpffs directory (`inbound_<netns cookie>`).
//!
//! Pinning keeps the program attached while the agent restarts: SYNs then find no listener on
//! 15006 and are dropped, so inbound connections fail closed instead of reaching the app
//! around the agent. A restarted agent attaches a fresh link before dropping the old pin.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use mesh_common::names;
use tracing::{debug, warn};

use super::{Capture, CaptureError, prog_err};

/// The pod's interface by Kubernetes convention (the CNI_IFNAME kubelet passes): chosen when
/// the pod's IP does not settle which interface to capture on.
pub const POD_INTERFACE: &str = "eth0";

/// The interface inbound capture attaches to, among the namespace's interfaces with IPv4
/// addresses other than loopback (`name`, addresses): the one holding the pod's IP; else the
/// only one; else `eth0`. Anything else is refused, naming what was found, rather than
/// guessed: capture on the wrong interface would let traffic reach the pod around the agent.
fn pick_interface(
    interfaces: &[(String, Vec<Ipv4Addr>)],
    pod_ip: Option<Ipv4Addr>,
) -> Result<String, String> {
    let holding = |ip: Ipv4Addr| interfaces.iter().find(|(_, a)| a.contains(&ip));
    if let Some((name, _)) = pod_ip.and_then(holding) {
        return Ok(name.clone());
    }
    let found = || {
        let list: Vec<String> = interfaces
            .iter()
            .map(|(n, a)| format!("{n} {a:?}"))
            .collect();
        if list.is_empty() {
            "none with an IPv4 address".to_owned()
        } else {
            list.join(", ")
        }
    };
    match interfaces {
        [(name, _)] if pod_ip.is_none() => Ok(name.clone()),
        _ if pod_ip.is_none() && interfaces.iter().any(|(n, _)| n == POD_INTERFACE) => {
            Ok(POD_INTERFACE.to_owned())
        }
        _ => Err(match pod_ip {
            Some(ip) => format!("no interface holds the pod's IP {ip} (found: {})", found()),
            None => format!(
                "the pod's IP is not known and there is no single interface or {POD_INTERFACE} \
                 (found: {})",
                found()
            ),
        }),
    }
}

/// The calling thread's network namespace's interfaces with IPv4 addresses, loopback aside.
/// Hand-written over `getifaddrs(3)`: one call, and the only use the agent has for it, which
/// does not justify a netlink crate on the data plane's side.
fn ipv4_interfaces() -> io::Result<Vec<(String, Vec<Ipv4Addr>)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out: Vec<(String, Vec<Ipv4Addr>)> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of its sa_family.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in; ifa_name is a NUL-terminated string.
        let (addr, name) = unsafe {
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name);
            (
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                name.to_string_lossy().into_owned(),
            )
        };
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, addrs)) => addrs.push(addr),
            None => out.push((name, vec![addr])),
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Puts the calling thread into another network namespace until dropped, then back.
/// `!Send`: `setns` changes only the calling thread, so the guard must not move threads.
struct NetNsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetNsGuard {
    fn enter(path: &Path) -> io::Result<NetNsGuard> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(path)?;
        setns(&target)?;
        Ok(NetNsGuard {
            original,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // Nothing sane can continue on a thread stuck in a pod's namespace.
            panic!("cannot return to the agent's network namespace: {e}");
        }
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; changes only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin_path(pin_dir: &Path, cookie: u64) -> PathBuf {
    pin_dir.join(format!("inbound_{cookie}"))
}

impl Capture {
    /// Attaches inbound capture to the pod's interface ([`pick_interface`]) in the namespace
    /// at `netns` (whose cookie is `cookie`), replacing a link a previous agent pinned for it.
    pub fn attach_inbound(
        &mut self,
        netns: &Path,
        cookie: u64,
        pod_ip: Option<Ipv4Addr>,
    ) -> Result<(), CaptureError> {
        let name = names::PROG_INBOUND;
        let path = pin_path(&self.pin_dir, cookie);
        let link = {
            let _guard = NetNsGuard::enter(netns).map_err(|source| CaptureError::Netns {
                path: netns.to_owned(),
                source,
            })?;
            let interfaces = ipv4_interfaces().map_err(|source| CaptureError::Netns {
                path: netns.to_owned(),
                source,
            })?;
            let interface = pick_interface(&interfaces, pod_ip).map_err(|reason| {
                CaptureError::PodInterface {
                    path: netns.to_owned(),
                    reason,
                }
            })?;
            let prog: &mut SchedClassifier = super::program(&mut self.ebpf, name)?;
            let id = prog
                .attach_with_options(
                    &interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(prog_err(name))?;
            prog.take_link(id).map_err(prog_err(name))?
        };
        let link: FdLink = link.try_into().map_err(|e| CaptureError::Pin {
            what: name,
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        // The new link runs before the old one goes: no gap in capture.
        if path.exists() {
            match PinnedLink::from_pin(&path)
                .map_err(io::Error::other)
                .and_then(PinnedLink::unpin)
            {
                Ok(old) => drop(old),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot take over the old inbound link, removing its pin");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        link.pin(&path).map_err(|e| CaptureError::Pin {
            what: name,
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        debug!(netns = %netns.display(), cookie, "inbound capture attached");
        Ok(())
    }

    /// Detaches inbound capture of the pod (its pin goes, and with it the link).
    pub fn detach_inbound(&mut self, cookie: u64) {
        let path = pin_path(&self.pin_dir, cookie);
        match PinnedLink::from_pin(&path)
            .map_err(io::Error::other)
            .and_then(PinnedLink::unpin)
        {
            Ok(link) => drop(link),
            Err(e) if path.exists() => {
                warn!(path = %path.display(), error = %e, "cannot detach inbound capture; removing its pin");
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {}
        }
    }

    /// Netns cookies with a pinned inbound link (including ones a previous agent left).
    pub fn inbound_cookies(&self) -> Vec<u64> {
        let Ok(dir) = std::fs::read_dir(&self.pin_dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("inbound_")?
                    .parse()
                    .ok()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(list: &[(&str, &[&str])]) -> Vec<(String, Vec<Ipv4Addr>)> {
        list.iter()
            .map(|(n, a)| {
                let addrs = a.iter().map(|a| a.parse().expect("IPv4")).collect();
                ((*n).to_owned(), addrs)
            })
            .collect()
    }

    #[test]
    fn the_interface_holding_the_pod_ip_else_the_only_one_else_eth0() {
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().expect("IPv4"));
        let multus = ifs(&[("eth0", &["10.244.1.5"]), ("net1", &["192.168.5.9"])]);
        assert_eq!(
            pick_interface(&multus, ip("10.244.1.5")).as_deref(),
            Ok("eth0")
        );
        assert_eq!(
            pick_interface(&multus, ip("192.168.5.9")).as_deref(),
            Ok("net1")
        );
        // The pod's IP not known yet (CNI ADD runs before the kubelet reports it).
        assert_eq!(pick_interface(&multus, None).as_deref(), Ok("eth0"));
        let renamed = ifs(&[("net0", &["10.244.1.5"])]);
        assert_eq!(pick_interface(&renamed, None).as_deref(), Ok("net0"));
        assert_eq!(
            pick_interface(&renamed, ip("10.244.1.5")).as_deref(),
            Ok("net0")
        );
        // Refused, naming what there is: never a guess.
        let e = pick_interface(&renamed, ip("10.244.1.6")).expect_err("IP not held");
        assert!(e.contains("10.244.1.6") && e.contains("net0"), "{e}");
        let two = ifs(&[("a", &["10.0.0.1"]), ("b", &["10.0.0.2"])]);
        let e = pick_interface(&two, None).expect_err("ambiguous");
        assert!(e.contains("a [10.0.0.1], b [10.0.0.2]"), "{e}");
        let e = pick_interface(&[], None).expect_err("nothing");
        assert!(e.contains("none with an IPv4 address"), "{e}");
    }

    #[test]
    fn lists_this_namespaces_interfaces_without_loopback() {
        let list = ipv4_interfaces().expect("getifaddrs");
        assert!(
            list.iter().all(|(_, a)| a.iter().all(|a| !a.is_loopback())),
            "{list:?}"
        );
    }
}
