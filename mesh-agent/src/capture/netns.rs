//! A pod's network namespace, as the agent uses it: one thread lives inside it and makes the
//! sockets the agent needs there (the pod's listeners and the upstream sockets of its
//! outbound connections). A socket belongs to the namespace it was created in, so once made it
//! can be driven from any tokio worker.
//!
//! Upstream sockets are made ahead of time into a small bounded pool, so the connection path
//! takes a ready socket without a thread hop; the pool refills in the background.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use socket2::{Domain, Protocol, Socket, Type};

use mesh_common::AGENT_MARK;

/// Pre-made upstream sockets per pod.
const POOL_SIZE: usize = 16;
/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h); not exported by libc for all targets.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr} in network namespace {path}: {source}")]
    Listen {
        path: PathBuf,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot read the netns cookie in {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error("the socket thread of network namespace {path} is gone")]
    ThreadGone { path: PathBuf },
    #[error("cannot set up local delivery in network namespace {path}: {source}")]
    Delivery {
        path: PathBuf,
        source: super::delivery::DeliveryError,
    },
}

/// Enters `ns` on the current thread (`setns(CLONE_NEWNET)`).
fn enter(ns: &File, path: &Path) -> Result<(), NetnsError> {
    // SAFETY: plain syscall on a valid fd; only changes this thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Reads `SO_NETNS_COOKIE` of a socket: the identity of the namespace it lives in, the same
/// value `bpf_get_netns_cookie()` returns in the eBPF programs.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length describe `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `IP_BIND_ADDRESS_NO_PORT` (socket2 has no setter for it): a later `bind(ip, 0)` leaves the
/// port to `connect()`, which picks one free for the whole 4-tuple. Without it `bind` must
/// find a port free for the address alone, scanning past every socket already bound to it
/// (TIME_WAIT ones included): delivering with the client pod's IP as source, that scan took
/// most of the destination agent's CPU once a few thousand connections from one pod had
/// closed, and the range runs out sooner.
pub fn bind_address_no_port(sock: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd; the value pointer and length describe `on`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket carrying the agent's mark, so the capture programs leave it alone.
pub fn agent_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_mark(AGENT_MARK)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// A listener the agent makes inside a pod's namespace.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub addr: SocketAddrV4,
    /// `IP_TRANSPARENT`: accepts connections the tc program assigns to it for other ports.
    pub transparent: bool,
}

fn listener(l: Listen) -> io::Result<Socket> {
    let addr = SocketAddr::V4(l.addr);
    let s = agent_socket(Domain::for_address(addr))?;
    s.set_reuse_address(true)?;
    if l.transparent {
        s.set_ip_transparent_v4(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// The agent's presence in one pod's network namespace.
pub struct PodNetns {
    path: PathBuf,
    cookie: u64,
    pool: Receiver<io::Result<OwnedFd>>,
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetns")
            .field("path", &self.path)
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl PodNetns {
    /// Opens the namespace at `path`, creates a listener on each of `listen` inside it (and,
    /// with `local_delivery`, the routing that lets the agent connect to the pod's apps with
    /// a client's source IP) and starts the socket thread. Returns the namespace handle and
    /// the (non-blocking) listeners, in the order asked.
    pub fn open(
        path: &Path,
        listen: &[Listen],
        local_delivery: bool,
    ) -> Result<(PodNetns, Vec<std::net::TcpListener>), NetnsError> {
        let ns = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(POOL_SIZE);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_path = path.to_owned();
        let listen = listen.to_vec();
        // The thread is not joined: it ends by itself once every SocketSource is dropped, so
        // an unenroll never waits for live connections.
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || {
                let setup = (|| {
                    enter(&ns, &thread_path)?;
                    if local_delivery {
                        super::delivery::install().map_err(|source| NetnsError::Delivery {
                            path: thread_path.clone(),
                            source,
                        })?;
                    }
                    let mut listeners = Vec::with_capacity(listen.len());
                    for l in &listen {
                        let l = listener(*l).map_err(|source| NetnsError::Listen {
                            path: thread_path.clone(),
                            addr: SocketAddr::V4(l.addr),
                            source,
                        })?;
                        listeners.push(std::net::TcpListener::from(l));
                    }
                    let probe =
                        agent_socket(Domain::IPV4).map_err(|source| NetnsError::Cookie {
                            path: thread_path.clone(),
                            source,
                        })?;
                    let cookie = netns_cookie(&probe).map_err(|source| NetnsError::Cookie {
                        path: thread_path.clone(),
                        source,
                    })?;
                    Ok::<_, NetnsError>((listeners, cookie))
                })();
                let ok = setup.is_ok();
                if ready_tx.send(setup).is_err() || !ok {
                    return;
                }
                // Keep the pool full until every receiver is gone (the pod was unenrolled).
                loop {
                    let s = agent_socket(Domain::IPV4).map(OwnedFd::from);
                    if pool_tx.send(s).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;
        let (listeners, cookie) = ready_rx.recv().map_err(|_| NetnsError::ThreadGone {
            path: path.to_owned(),
        })??;
        Ok((
            PodNetns {
                path: path.to_owned(),
                cookie,
                pool: pool_rx,
            },
            listeners,
        ))
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for the connection path: takes upstream sockets made in this namespace.
    pub fn sockets(&self) -> SocketSource {
        SocketSource {
            pool: self.pool.clone(),
        }
    }
}

/// Where the connection path gets upstream sockets inside a pod's namespace.
#[derive(Clone)]
pub struct SocketSource {
    pool: Receiver<io::Result<OwnedFd>>,
}

impl SocketSource {
    /// A fresh, marked, non-blocking IPv4 TCP socket inside the pod's namespace.
    pub async fn socket(&self) -> io::Result<tokio::net::TcpSocket> {
        let fd = match self.pool.try_recv() {
            Ok(fd) => fd?,
            Err(_) => {
                // Pool drained by a burst: wait for the refill off the async workers.
                let pool = self.pool.clone();
                tokio::task::spawn_blocking(move || {
                    match pool.recv_timeout(Duration::from_secs(2)) {
                        Ok(fd) => fd,
                        Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no upstream socket from the pod's namespace within 2s",
                        )),
                        Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the pod's namespace thread is gone",
                        )),
                    }
                })
                .await
                .map_err(io::Error::other)??
            }
        };
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }
}
