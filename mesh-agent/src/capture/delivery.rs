//! Local delivery with the client's source IP, set up once per enrolled pod inside its
//! network namespace (the calling thread must already be in it).
//!
//! The destination agent connects to the app from a socket bound to the client pod's IP
//! (`IP_TRANSPARENT`) and marked [`DELIVER_MARK`]. The app's accepted socket inherits that
//! mark (`net.ipv4.tcp_fwmark_accept=1`; `fwmark_reflect=1` does the same for the kernel's
//! own RSTs), and a policy rule sends packets with the mark to a
//! table whose only route is `local 0.0.0.0/0 dev lo`: the app's replies to the client's IP
//! come back to the agent instead of leaving through eth0. No iptables involved.

use std::io;
use std::net::Ipv4Addr;

use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, RouteMessageBuilder};

use mesh_common::DELIVER_MARK;

/// Routing table holding the local-delivery route (the value is arbitrary but fixed).
pub const DELIVER_TABLE: u32 = 0x5eee;
/// Priority of the policy rule: before `main` (32766), after `local` (0).
pub const DELIVER_RULE_PRIORITY: u32 = 100;
/// `ifindex` of `lo`, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// The app's accepted socket inherits the SYN's mark.
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// Replies the kernel makes itself (a RST from a closed port, ICMP) carry the mark of the
/// packet they answer, so a refused connect comes back to the agent at once instead of
/// timing out.
const FWMARK_REFLECT: &str = "/proc/sys/net/ipv4/fwmark_reflect";

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("writing {path}: {source}")]
    Sysctl {
        path: &'static str,
        source: io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(io::Error),
    #[error("adding rule `fwmark {DELIVER_MARK:#x} lookup {DELIVER_TABLE}`: {0}")]
    Rule(rtnetlink::Error),
    #[error("adding route `local 0.0.0.0/0 dev lo table {DELIVER_TABLE}`: {0}")]
    Route(rtnetlink::Error),
}

/// Installs the sysctl, rule and route in the current thread's network namespace.
/// Idempotent: what exists already is left as it is.
pub fn install() -> Result<(), DeliveryError> {
    // /proc/sys/net resolves to the network namespace of the thread that opens it.
    for path in [FWMARK_ACCEPT, FWMARK_REFLECT] {
        std::fs::write(path, b"1").map_err(|source| DeliveryError::Sysctl { path, source })?;
    }
    // rtnetlink is async; a throwaway runtime on this (namespace) thread runs the two
    // requests. The netlink socket is created here, so it talks to this namespace.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(DeliveryError::Netlink)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(DeliveryError::Netlink)?;
        let conn = tokio::spawn(conn);
        let result = add_rule_and_route(&handle).await;
        conn.abort();
        result
    })
}

async fn add_rule_and_route(handle: &Handle) -> Result<(), DeliveryError> {
    let rule = handle
        .rule()
        .add()
        .v4()
        .fw_mark(DELIVER_MARK)
        .table_id(DELIVER_TABLE)
        .priority(DELIVER_RULE_PRIORITY)
        .action(RuleAction::ToTable)
        .execute()
        .await;
    ignore_exists(rule).map_err(DeliveryError::Rule)?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(LOOPBACK_IFINDEX)
        .table_id(DELIVER_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build();
    let route = handle.route().add(route).replace().execute().await;
    ignore_exists(route).map_err(DeliveryError::Route)
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => Ok(()),
        other => other,
    }
}
