//! nodemesh outbound capture.
//!
//! * `connect4` / `connect6` (cgroup/connect4, cgroup/connect6): a TCP `connect()` from an
//!   enrolled pod's network namespace to a non-loopback IPv4 destination (or an IPv4-mapped
//!   IPv6 one) is rewritten to 127.0.0.1:15001 inside that same namespace, where the agent
//!   listens. The original destination is saved under the socket cookie.
//! * `record_orig_dst` (sock_ops, TCP_CONNECT_CB): once the kernel has chosen the source
//!   port, the original destination is copied to ORIG_DST keyed by (netns cookie, source ip,
//!   source port): exactly what the agent sees as the peer of the accepted connection. It
//!   also asks for state callbacks on that socket, to forget it when it closes.
//! * `getpeername4` / `getpeername6`: the application asking for its peer sees the original
//!   destination (the Service), not 127.0.0.1:15001.
//! * `inbound_capture` (tc ingress, see `inbound`): new inbound TCP connections of an
//!   enrolled pod go to the agent's listener on 15006.
//! * `fast_path_msg` (sk_msg, see `fast_path`): the loopback hops between an app and the
//!   agent skip the TCP/IP stack; the same sock_ops program fills its SOCKHASH.
//!
//! Every program is `match try_x(..) { Ok(v) => v, Err(_) => SAFE }`; no path can panic, all
//! work is bounded (a few map operations), and the stack holds two small structs.
#![no_std]
#![no_main]

mod fast_path;
mod inbound;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AF_INET, AGENT_MARK, DELIVER_MARK, ENROLLED_CAPACITY, EnrolledPod, ORIG_DST_CAPACITY, OrigDst,
    OrigDstKey, ports, stats,
};

/// Allow the `connect()` (possibly rewritten). cgroup/connect programs return 1 to allow.
const CONNECT_ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
/// 127.0.0.1 in network byte order, as the kernel stores `user_ip4`.
const LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Netns cookies of enrolled pods. Written by the agent only after the pod's listeners exist.
#[map(name = "ENROLLED")]
pub(crate) static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(ENROLLED_CAPACITY, 0);

/// Original destinations by socket cookie, from connect() until the socket closes (sock_ops'
/// state callback removes it); read by getpeername.
#[map(name = "SOCK_ORIG_DST")]
static SOCK_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

/// Original destinations by (netns cookie, source ip, source port); the agent looks each up
/// after accept() and deletes it.
#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

/// Counters, see `mesh_common::stats`.
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate CPU while running.
        unsafe { *slot += 1 };
    }
}

/// True if `ip` (network byte order) must never be captured: loopback and 0.0.0.0.
#[inline(always)]
fn is_local(ip_be: u32) -> bool {
    let host = u32::from_be(ip_be);
    host >> 24 == 127 || host == 0
}

/// Decides whether this connect is captured. Returns the netns cookie if it is.
#[inline(always)]
fn should_capture(ctx: &SockAddrContext, dst_ip_be: u32) -> Option<u64> {
    // SAFETY: `sock_addr` is the context pointer the kernel handed to the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || is_local(dst_ip_be) {
        return None;
    }
    // SAFETY: the verifier guarantees `sk` is a valid socket pointer in cgroup/connect.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null kernel socket pointer, `mark` is a readable field.
    let mark = unsafe { (*sk).mark };
    if mark == AGENT_MARK || mark == DELIVER_MARK {
        count(stats::SKIPPED_AGENT_MARK);
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    unsafe { ENROLLED.get(netns) }?;
    Some(netns)
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, netns_cookie: u64, ip4: u32, port_be: u32) {
    let orig = OrigDst {
        ip4,
        port: u16::from_be(port_be as u16),
        family: AF_INET,
        netns_cookie,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_ORIG_DST
        .insert(cookie, orig, u64::from(BPF_ANY))
        .is_err()
    {
        count(stats::MAP_ERRORS);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(v) => v,
        Err(_) => CONNECT_ALLOW,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    // SAFETY: context pointer from the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = sa.user_ip4;
    let Some(netns) = should_capture(ctx, dst) else {
        return Ok(CONNECT_ALLOW);
    };
    remember(ctx, netns, dst, sa.user_port);
    // Even if remembering failed the socket is redirected: the agent then refuses it, which
    // fails closed instead of letting the connection around the mesh.
    sa.user_ip4 = LOOPBACK_BE;
    sa.user_port = u32::from(ports::OUTBOUND.to_be());
    count(stats::REDIRECTED);
    Ok(CONNECT_ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(v) => v,
        Err(_) => CONNECT_ALLOW,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    // SAFETY: context pointer from the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    // The kernel only allows 4-byte loads of user_ip6, one word at a time.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    // Only IPv4-mapped destinations (::ffff:a.b.c.d) are captured: native IPv6 is not served
    // by the agent yet.
    if w0 != 0 || w1 != 0 || w2 != 0x0000_ffffu32.to_be() {
        return Ok(CONNECT_ALLOW);
    }
    let Some(netns) = should_capture(ctx, w3) else {
        return Ok(CONNECT_ALLOW);
    };
    remember(ctx, netns, w3, sa.user_port);
    sa.user_ip6[3] = LOOPBACK_BE;
    sa.user_port = u32::from(ports::OUTBOUND.to_be());
    count(stats::REDIRECTED);
    Ok(CONNECT_ALLOW)
}

#[sock_ops]
pub fn record_orig_dst(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx).unwrap_or(1)
}

fn try_sockops(ctx: &SockOpsContext) -> Result<u32, i64> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => fast_path::on_established(ctx, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => fast_path::on_established(ctx, true),
        // Only sockets that asked for it (captured and fast-path ones) get state callbacks.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SOCK_ORIG_DST.remove(cookie);
            fast_path::on_close(ctx);
        }
        _ => {}
    }
    Ok(1)
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map is touched again.
    let Some(orig) = (unsafe { SOCK_ORIG_DST.get(cookie) }).copied() else {
        return;
    };
    let key = OrigDstKey {
        netns_cookie: orig.netns_cookie,
        src_ip4: ctx.local_ip4(),
        // sock_ops' local_port is in host byte order.
        src_port: ctx.local_port() as u16,
        _pad: 0,
    };
    if ORIG_DST.insert(key, orig, u64::from(BPF_ANY)).is_err() {
        count(stats::MAP_ERRORS);
    } else {
        count(stats::RECORDED);
    }
    // Forget the socket when it closes; without the callback the LRU still bounds the map.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        count(stats::MAP_ERRORS);
    }
}

/// The original destination of a captured socket, by its cookie.
#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { SOCK_ORIG_DST.get(cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn peer_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(&ctx) {
        // SAFETY: context pointer from the kernel; these fields are writable here.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip4;
        sa.user_port = u32::from(orig.port.to_be());
    }
    CONNECT_ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn peer_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(&ctx) {
        // SAFETY: as above.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0x0000_ffffu32.to_be();
        sa.user_ip6[3] = orig.ip4;
        sa.user_port = u32::from(orig.port.to_be());
    }
    CONNECT_ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
