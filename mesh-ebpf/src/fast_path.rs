//! The fast path: the loopback hops between an app and the agent inside an enrolled pod's
//! network namespace skip the TCP/IP stack.
//!
//! * `sock_ops` (ACTIVE/PASSIVE_ESTABLISHED): both ends of those hops go into the FAST_PATH
//!   SOCKHASH, keyed by (netns cookie, local, remote). The hops are: the app's captured
//!   connection to 127.0.0.1:15001 and the agent's accepted end of it; the agent's delivery
//!   connection to the app (mark `DELIVER_MARK`) and the app's accepted end of it (which
//!   inherits the mark, `tcp_fwmark_accept`). Nothing else on the node is touched. The kernel
//!   removes a socket from the SOCKHASH itself when it closes.
//! * `fast_path_msg` (sk_msg on FAST_PATH): each message a socket in the map sends is put
//!   straight on its peer's receive queue (`bpf_msg_redirect_hash`, `BPF_F_INGRESS`).
//!
//! Ordering: a message of a socket whose peer is not in the map yet (the peer's end is still
//! being accepted) goes through the stack. Bytes redirected later would be read before it
//! (the receiver drains the redirected queue first), so such a socket is pinned to the stack
//! for the rest of its life (FAST_PATH_SENT holds `PINNED` for it). The same holds while the
//! fast path is off, so turning it on again never reorders a live connection.
//!
//! Memory: the kernel charges redirected bytes to the receiver without bounding them by its
//! receive buffer (only the global TCP memory limit applies), so a reader that stops reading
//! would let its peer queue without limit. FAST_PATH_SENT counts the bytes each socket has
//! redirected; past the budget (FAST_PATH_ON[1]) the socket is pinned to the stack, where
//! TCP flow control bounds it again. Request/response traffic stays under it; bulk transfers
//! go on over the stack.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_STATE_CB_FLAG, sk_action::SK_PASS},
    cty::c_long,
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg},
    maps::{Array, HashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    DELIVER_MARK, ENROLLED_SELF_TEST, FAST_PATH_BUDGET_INDEX, FAST_PATH_CAPACITY,
    FAST_PATH_ON_INDEX, FAST_PATH_PINNED as PINNED, SockKey, ports, remote_port_host, stats,
};

use crate::{ENROLLED, count};

const AF_INET: u32 = 2;

/// Both ends of every accelerated loopback connection.
#[map(name = "FAST_PATH")]
static FAST_PATH: SockHash<SockKey> = SockHash::pinned(FAST_PATH_CAPACITY, 0);

/// Per sending socket: bytes it has redirected, or `PINNED` once it must use the stack for
/// good (see the module documentation). Entries go when the socket closes (sock_ops state
/// callback).
#[map(name = "FAST_PATH_SENT")]
static FAST_PATH_SENT: HashMap<SockKey, u32> = HashMap::pinned(FAST_PATH_CAPACITY, 0);

/// Index 0 (`FAST_PATH_ON_INDEX`): 1 when the agent has turned the fast path on (after its
/// self-test), else 0. Index 1 (`FAST_PATH_BUDGET_INDEX`): bytes a socket may redirect.
#[map(name = "FAST_PATH_ON")]
static FAST_PATH_ON: Array<u32> = Array::pinned(2, 0);

#[inline(always)]
fn is_loopback(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}

/// True if the fast path runs for sockets of the namespace with these ENROLLED flags.
#[inline(always)]
fn on_for(flags: u32) -> bool {
    flags & ENROLLED_SELF_TEST != 0 || globally_on()
}

#[inline(always)]
fn globally_on() -> bool {
    FAST_PATH_ON
        .get(FAST_PATH_ON_INDEX)
        .is_some_and(|v| *v != 0)
}

/// sock_ops, a TCP connection just established (`passive`: the accepted end).
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext, passive: bool) {
    if ctx.family() != AF_INET {
        return;
    }
    // SAFETY: helper valid for sock_ops programs (kernel >= 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    let Some(pod) = (unsafe { ENROLLED.get(netns) }) else {
        return;
    };
    if !on_for(pod.flags) {
        return;
    }
    let key = sock_ops_key(ctx, netns);
    if !is_agent_hop(ctx, &key, passive) {
        return;
    }
    // SAFETY: the context pointer the kernel handed to this sock_ops program.
    let ops = unsafe { &mut *ctx.ops };
    if FAST_PATH.update(key, ops, u64::from(BPF_ANY)).is_err() {
        count(stats::MAP_ERRORS);
        return;
    }
    count(stats::FAST_PATH_INSERTED);
    // Asks for the close callback, which forgets the socket's FAST_PATH_SENT entry.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(stats::MAP_ERRORS);
    }
}

/// One end of an app-to-agent hop: the 127.0.0.1:15001 connection of a captured `connect()`,
/// or the agent's delivery connection to the app (marked, as is the app's accepted end).
#[inline(always)]
fn is_agent_hop(ctx: &SockOpsContext, key: &SockKey, passive: bool) -> bool {
    let outbound = if passive {
        key.local_port == ports::OUTBOUND && is_loopback(key.local_ip4)
    } else {
        key.remote_port == ports::OUTBOUND && is_loopback(key.remote_ip4)
    };
    outbound || socket_mark(ctx) == Some(DELIVER_MARK)
}

#[inline(always)]
fn socket_mark(ctx: &SockOpsContext) -> Option<u32> {
    // SAFETY: `sk` is the (nullable) socket pointer of the sock_ops context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null `bpf_sock` pointer from the context; `mark` is readable.
    Some(unsafe { (*sk).mark })
}

/// sock_ops state callback, the socket closed.
#[inline(always)]
pub fn on_close(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    // SAFETY: helper valid for sock_ops programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = FAST_PATH_SENT.remove(sock_ops_key(ctx, netns));
}

/// The socket's key as sock_ops sees it (the same one sk_msg builds for it).
#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    SockKey {
        netns_cookie: netns,
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        // sock_ops' local_port is in host byte order.
        local_port: ctx.local_port() as u16,
        remote_port: remote_port_host(ctx.remote_port()),
        _pad: 0,
    }
}

#[sk_msg]
pub fn fast_path_msg(ctx: SkMsgContext) -> u32 {
    // Whatever goes wrong, the message takes the stack: slower, never lost.
    match try_fast_path_msg(&ctx) {
        Ok(v) => v,
        Err(_) => SK_PASS,
    }
}

fn try_fast_path_msg(ctx: &SkMsgContext) -> Result<u32, i64> {
    // SAFETY: the context pointer the kernel handed to this sk_msg program.
    let md = unsafe { &*ctx.msg };
    if md.family != AF_INET {
        return Ok(SK_PASS);
    }
    // SAFETY: helper valid for sk_msg programs (kernel >= 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = SockKey {
        netns_cookie: netns,
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        // sk_msg's local_port is in host byte order, remote_port in network byte order.
        local_port: md.local_port as u16,
        remote_port: remote_port_host(md.remote_port),
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; only this socket's sendmsg (under its socket
    // lock) and its close touch the entry.
    let sent = unsafe { FAST_PATH_SENT.get(key) }.copied().unwrap_or(0);
    if sent == PINNED {
        count(stats::FAST_PATH_STACK);
        return Ok(SK_PASS);
    }
    let on = globally_on()
        // SAFETY: read-only lookup of a plain value.
        || unsafe { ENROLLED.get(netns) }.is_some_and(|p| p.flags & ENROLLED_SELF_TEST != 0);
    let budget = FAST_PATH_ON
        .get(FAST_PATH_BUDGET_INDEX)
        .copied()
        .unwrap_or(0);
    let total = sent.saturating_add(md.size);
    if on && total <= budget {
        let mut peer = key.peer();
        let verdict = FAST_PATH.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
        if verdict == SK_PASS as c_long {
            if FAST_PATH_SENT
                .insert(key, total, u64::from(BPF_ANY))
                .is_err()
            {
                count(stats::MAP_ERRORS);
            }
            count(stats::FAST_PATH_REDIRECTED);
            return Ok(SK_PASS);
        }
    }
    // The peer is not in the map, the budget is spent, or the fast path is off: this message
    // takes the stack, and so does every later one of this socket.
    if FAST_PATH_SENT
        .insert(key, PINNED, u64::from(BPF_ANY))
        .is_err()
    {
        count(stats::MAP_ERRORS);
    }
    count(stats::FAST_PATH_STACK);
    Ok(SK_PASS)
}
