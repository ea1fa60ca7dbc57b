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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use mesh_common::names;
use tracing::{debug, warn};

use super::{Capture, CaptureError, prog_err};

/// The pod's interface, as the CNI names it inside the pod.
pub const POD_INTERFACE: &str = "eth0";

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
    /// Attaches inbound capture to the pod's interface in the namespace at `netns` (whose
    /// cookie is `cookie`), replacing a link a previous agent pinned for it.
    pub fn attach_inbound(&mut self, netns: &Path, cookie: u64) -> Result<(), CaptureError> {
        let name = names::PROG_INBOUND;
        let path = pin_path(&self.pin_dir, cookie);
        let link = {
            let _guard = NetNsGuard::enter(netns).map_err(|source| CaptureError::Netns {
                path: netns.to_owned(),
                source,
            })?;
            let prog: &mut SchedClassifier = super::program(&mut self.ebpf, name)?;
            let id = prog
                .attach_with_options(
                    POD_INTERFACE,
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
