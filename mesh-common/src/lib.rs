//! Types shared by the eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]`, has no implicit padding and is `Copy`, because the
//! same bytes are read by the kernel-side programs and by user space through map syscalls.
#![no_std]

/// Ports the agent listens on inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: `connect()` calls of the pod are rewritten to 127.0.0.1:15001.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound mutual-TLS tunnel (HBONE).
    pub const INBOUND_HBONE: u16 = 15008;
}

/// `SO_MARK` carried by every socket the agent opens itself. The eBPF programs never redirect
/// a socket with this mark, so the agent's own upstream connections cannot loop back to it.
pub const AGENT_MARK: u32 = 0x0000_5eed;

/// `SO_MARK` of the agent's sockets that deliver inbound connections to an app in its pod,
/// bound to the client's IP (`IP_TRANSPARENT`). The pod's namespace routes replies carrying
/// this mark back to the agent (`tcp_fwmark_accept` plus a policy rule). Like [`AGENT_MARK`]
/// it is never captured, and it must differ from it, or the agent's own outbound traffic in
/// that namespace would be routed back to itself.
pub const DELIVER_MARK: u32 = 0x0000_5eee;

/// Names of the maps and programs, shared so that the agent looks up exactly what the eBPF
/// object defines.
pub mod names {
    pub const MAP_ENROLLED: &str = "ENROLLED";
    pub const MAP_SOCK_ORIG_DST: &str = "SOCK_ORIG_DST";
    pub const MAP_ORIG_DST: &str = "ORIG_DST";
    pub const MAP_STATS: &str = "STATS";
    pub const PROG_CONNECT4: &str = "capture_connect4";
    pub const PROG_CONNECT6: &str = "capture_connect6";
    pub const PROG_SOCK_OPS: &str = "record_orig_dst";
    pub const PROG_GETPEERNAME4: &str = "peer_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "peer_getpeername6";
    pub const PROG_INBOUND: &str = "inbound_capture";
    pub const MAP_FAST_PATH: &str = "FAST_PATH";
    pub const MAP_FAST_PATH_SENT: &str = "FAST_PATH_SENT";
    pub const MAP_FAST_PATH_ON: &str = "FAST_PATH_ON";
    pub const PROG_FAST_PATH_MSG: &str = "fast_path_msg";
}

/// Capacity of the ENROLLED map: pods per node.
pub const ENROLLED_CAPACITY: u32 = 4096;
/// Capacity of the LRU maps holding original destinations of connections in flight.
pub const ORIG_DST_CAPACITY: u32 = 65536;

/// Capacity of the SOCKHASH of the fast path (sockets, two per accelerated connection) and of
/// FAST_PATH_SENT (one entry per fast-path socket that has sent).
pub const FAST_PATH_CAPACITY: u32 = 65536;

/// Value of the ENROLLED map (key: netns cookie, `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// `ENROLLED_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// FAST_PATH_ON index of the on/off switch (1 = on).
pub const FAST_PATH_ON_INDEX: u32 = 0;
/// FAST_PATH_ON index of the budget: bytes one socket may redirect before it is pinned to the
/// TCP/IP stack (where flow control bounds what a stalled reader can make its peer queue).
pub const FAST_PATH_BUDGET_INDEX: u32 = 1;
/// FAST_PATH_SENT value of a socket pinned to the stack for good.
pub const FAST_PATH_PINNED: u32 = u32::MAX;

/// [`EnrolledPod::flags`]: the agent's own fast-path self-test namespace, where the fast path
/// runs even while it is off for pods (it has to, to be tested before it is turned on).
pub const ENROLLED_SELF_TEST: u32 = 1;

/// Key of the fast path's SOCKHASH: one end of a loopback connection inside an enrolled pod's
/// network namespace, as that end sees it. The peer's key is the same with local and remote
/// swapped; the netns cookie keeps equal loopback tuples of two pods apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// IPv4 addresses in network byte order.
    pub local_ip4: u32,
    pub remote_ip4: u32,
    /// Ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[must_use]
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Port of a `remote_port` field of `bpf_sock_ops` / `sk_msg_md` in host byte order. The
/// kernel stores it in network byte order, shifted into the upper half of the word on
/// little-endian machines (older kernels left it in the lower half); a port is never 0 on an
/// established socket, so the half that is not zero is the port.
#[must_use]
pub const fn remote_port_host(raw: u32) -> u16 {
    let be = if raw & 0xffff == 0 { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// An original destination, as the application asked for it in `connect()`.
///
/// `ip` holds an IPv4 address in network byte order in its first word; the other words are
/// zero (IPv6 destinations are not captured in this slice). `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip4: u32,
    pub port: u16,
    pub family: u16,
    /// Netns cookie of the socket that connected, copied from connect time so that
    /// `sock_ops` needs no netns helper.
    pub netns_cookie: u64,
}

/// Key of the ORIG_DST map: who connected, as the agent sees it on accept.
///
/// The agent accepts on 127.0.0.1:15001 inside the pod's netns and learns the peer
/// (source) address and port; together with the pod's netns cookie that is unique.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// Source IPv4 address of the captured connection, network byte order.
    pub src_ip4: u32,
    /// Source port, host byte order.
    pub src_port: u16,
    pub _pad: u16,
}

/// Indexes into the per-CPU STATS array.
pub mod stats {
    /// connect() calls rewritten to the agent.
    pub const REDIRECTED: u32 = 0;
    /// connect() calls skipped because the socket carries the agent's mark.
    pub const SKIPPED_AGENT_MARK: u32 = 1;
    /// sock_ops copied an original destination from SOCK_ORIG_DST to ORIG_DST.
    pub const RECORDED: u32 = 2;
    /// A map update failed (map full, ...): the connection was still redirected.
    pub const MAP_ERRORS: u32 = 3;
    /// Inbound SYNs (tc ingress of an enrolled pod) handed to the agent's listener on 15006.
    pub const INBOUND_CAPTURED: u32 = 4;
    /// Inbound SYNs dropped because the agent's 15006 listener was missing (agent down):
    /// fail closed, never around the agent.
    pub const INBOUND_NO_LISTENER: u32 = 5;
    /// Sockets sock_ops put into the fast path's SOCKHASH.
    pub const FAST_PATH_INSERTED: u32 = 6;
    /// Messages sk_msg moved straight to the peer socket (no TCP/IP stack).
    pub const FAST_PATH_REDIRECTED: u32 = 7;
    /// Messages of a fast-path socket that went through the stack: the peer was not (yet) in
    /// the SOCKHASH, the socket's budget was spent, or the fast path is off. Such a socket
    /// stays on the stack for good, so its bytes are never reordered.
    pub const FAST_PATH_STACK: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// `family` values of [`OrigDst`].
pub const AF_INET: u16 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), no padding holes that carry uninitialised bytes
    // (explicit padding fields), every bit pattern valid.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EnrolledPod>(), 8);
        assert_eq!(size_of::<OrigDst>(), 16);
        assert_eq!(size_of::<OrigDstKey>(), 16);
        assert_eq!(size_of::<SockKey>(), 24);
    }

    #[test]
    fn remote_port_in_either_half() {
        // 8080 = 0x1f90, network order bytes 1f 90; as a little-endian u16 that is 0x901f.
        let be = u32::from(8080u16.to_be());
        assert_eq!(remote_port_host(be), 8080);
        assert_eq!(remote_port_host(be << 16), 8080);
    }

    #[test]
    fn peer_key_swaps_ends() {
        let k = SockKey {
            netns_cookie: 7,
            local_ip4: 1,
            remote_ip4: 2,
            local_port: 3,
            remote_port: 4,
            _pad: 0,
        };
        assert_eq!(k.peer().peer(), k);
        assert_eq!((k.peer().local_ip4, k.peer().local_port), (2, 4));
    }
}
