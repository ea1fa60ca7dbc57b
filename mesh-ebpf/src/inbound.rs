//! Inbound capture: `tc` ingress on an enrolled pod's `eth0`, inside its namespace.
//!
//! Every TCP SYN for the pod (a new connection) on a port other than 15008 is assigned with
//! `bpf_sk_assign` to the agent's transparent listener on 15006 in that namespace, which
//! applies PeerAuthentication and delivers the connection to the app. Packets of established
//! connections, replies to the pod's own connections and everything that is not TCP over IPv4
//! pass untouched. If the listener is missing (the agent is gone) the SYN is dropped: inbound
//! connections fail closed rather than reach the app around the agent.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{ports, stats};

use crate::count;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// `BPF_TCP_LISTEN`, the state of a listening `bpf_sock`.
const TCP_LISTEN: u32 = 10;

#[classifier]
pub fn inbound_capture(ctx: TcContext) -> i32 {
    // A packet we cannot parse is not a TCP SYN we must steer: let it through.
    try_inbound(&ctx).unwrap_or(TC_ACT_OK)
}

fn try_inbound(ctx: &TcContext) -> Result<i32, i64> {
    if u16::from_be(ctx.load::<u16>(12)?) != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let vihl: u8 = ctx.load(ETH_HLEN)?;
    if vihl >> 4 != 4 || ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
        return Ok(TC_ACT_OK);
    }
    // Only first fragments carry the TCP header; a SYN is never fragmented.
    if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?) & 0x1fff != 0 {
        return Ok(TC_ACT_OK);
    }
    let saddr: u32 = ctx.load(ETH_HLEN + 12)?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16)?;
    let tcp = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
    let sport: u16 = ctx.load(tcp)?;
    let dport: u16 = ctx.load(tcp + 2)?;
    let flags: u8 = ctx.load(tcp + 13)?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN
        || u16::from_be(dport) == ports::INBOUND_HBONE
    {
        return Ok(TC_ACT_OK);
    }

    // The agent's listener: the lookup for (client, pod:15006) falls through to it.
    // SAFETY: a plain C struct of integers, valid when zeroed.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = ports::INBOUND_PLAINTEXT.to_be();
    // SAFETY: reading the size of the IPv4 member of the union just written.
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    // SAFETY: valid skb context, tuple on the stack with the IPv4 size given.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        count(stats::INBOUND_NO_LISTENER);
        return Ok(TC_ACT_SHOT);
    }
    // SAFETY: non-null socket from the lookup; released below on every path.
    let listening = unsafe { (*sk).state } == TCP_LISTEN;
    let assigned = if listening {
        // SAFETY: skb context and a referenced socket of the same namespace.
        unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) }
    } else {
        -1
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    if assigned != 0 {
        count(stats::INBOUND_NO_LISTENER);
        return Ok(TC_ACT_SHOT);
    }
    count(stats::INBOUND_CAPTURED);
    Ok(TC_ACT_OK)
}
