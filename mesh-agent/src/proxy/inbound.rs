//! Inbound: what arrives for an enrolled pod.
//!
//! - HBONE on the pod's 15008: a peer agent's mutual-TLS connection carries HTTP/2 CONNECT
//!   streams, each one TCP connection to this pod.
//! - Plaintext on 15006: every other new TCP connection to the pod, handed over by the tc
//!   program; PeerAuthentication decides whether it may reach the app (STRICT refuses it).
//!
//! AuthorizationPolicy is checked for every connection and stream before the app is
//! connected: a denied HBONE stream gets 401 with the reason, a denied plaintext connection
//! is reset. On ports parsed as HTTP each request is checked again with its method, path,
//! host and headers (403 `RBAC: access denied`, as Envoy answers). Connections from the node
//! itself (kubelet probes) are exempt, as they are from STRICT.
//!
//! Either way the connection is delivered to the app from inside the pod's namespace with the
//! client's IP as its source.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::connections::{ConnInfo, Direction, Progress, Protocol, Registered};
use super::hbone::stream::H2Stream;
use super::hbone::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, SEND_BUFFER, STREAM_WINDOW,
    after_ready, tls,
};
use super::relay::{Framing, Relayed, relay_revocable};
use super::{Ended, LogEntry, ProxyInputs, WorkloadStats};
use crate::capture::netns::SocketSource;
use crate::config::authz::{Connection, Denied, Stage};
use crate::config::model::MtlsMode;
use crate::config::model::ObjectRef;
use crate::identity::Identity;
use crate::telemetry::metrics::{Reporter, ResponseFlags, TcpLabels};
use mesh_common::DELIVER_MARK;

/// Time a peer gets to finish the TLS handshake, and again the HTTP/2 one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// CONNECT streams one peer connection may have open at once (hyper's server default).
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Streams a peer may make us reset for protocol errors before the connection is closed
/// (hyper's default; bounds "rapid reset" style abuse).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What one enrolled pod's HBONE listener needs.
pub struct HboneListener {
    pub pod: Arc<ObjectRef>,
    pub pod_ip: Ipv4Addr,
    pub listener: TcpListener,
    pub tls: TlsAcceptor,
    pub trust_domain: Arc<str>,
    pub sockets: SocketSource,
    pub stats: Arc<WorkloadStats>,
}

/// Counters of the inbound side, agent-wide.
#[derive(Debug, Default, Serialize)]
pub struct InboundStats {
    pub tls_accepted: std::sync::atomic::AtomicU64,
    pub tls_refused: std::sync::atomic::AtomicU64,
    pub streams: std::sync::atomic::AtomicU64,
    pub streams_refused: std::sync::atomic::AtomicU64,
    /// Plaintext connections delivered (PERMISSIVE).
    pub plaintext_accepted: std::sync::atomic::AtomicU64,
    /// Plaintext connections reset because the pod's policy is STRICT.
    pub plaintext_refused: std::sync::atomic::AtomicU64,
    /// Plaintext connections from the node itself (kubelet probes) let through under STRICT.
    pub node_probes: std::sync::atomic::AtomicU64,
    /// Connections and HBONE streams refused by AuthorizationPolicy.
    pub authz_denied: std::sync::atomic::AtomicU64,
}

/// After a configuration change: closes the inbound TCP connections that AuthorizationPolicy
/// refuses now (live connections are re-checked, not only new ones). Returns how many.
pub fn recheck(
    connections: &super::connections::ConnectionTable,
    routes: &super::RouteTable,
    inbound: &InboundStats,
) -> usize {
    let mut closed = 0;
    for c in connections.revocable() {
        let (SocketAddr::V4(peer), SocketAddr::V4(target)) = (c.client, c.upstream) else {
            continue;
        };
        let conn = Connection {
            source_ip: *peer.ip(),
            peer: c.peer_identity.as_deref(),
            destination_ip: *target.ip(),
            destination_port: target.port(),
        };
        if let Err(denied) = routes.authorize(target.ip(), &conn, Stage::Connection) {
            log_denied(
                inbound,
                &c.pod,
                peer,
                c.peer_identity.as_deref(),
                target,
                &denied,
            );
            if let Some(revoke) = &c.revoke {
                revoke.notify_one();
            }
            closed += 1;
        }
    }
    closed
}

/// Counts a denial and logs it (every one of the first 100, then one in 1000: a client
/// retrying in a loop must not flood the log).
pub(crate) fn log_denied(
    inbound: &InboundStats,
    pod: &ObjectRef,
    peer: SocketAddrV4,
    source: Option<&Identity>,
    target: SocketAddrV4,
    denied: &Denied,
) {
    let n = inbound.authz_denied.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 100 || n.is_multiple_of(1000) {
        let source = source.map_or_else(|| "none (plaintext)".to_string(), ToString::to_string);
        warn!(pod = %pod, %peer, %source, %target, denied_total = n, reason = %denied,
            "AuthorizationPolicy refused a connection");
    }
}

/// What one enrolled pod's plaintext inbound listener (15006) needs.
pub struct PlaintextListener {
    pub pod: Arc<ObjectRef>,
    pub pod_ip: Ipv4Addr,
    pub listener: TcpListener,
    pub sockets: SocketSource,
    pub stats: Arc<WorkloadStats>,
}

/// Accepts connections the tc program assigned to 15006 until aborted.
pub async fn serve_plaintext(inputs: ProxyInputs, l: PlaintextListener) {
    loop {
        let (tcp, peer) = match l.listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %l.pod, error = %e, "plaintext inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The accepted socket keeps the address the client asked for: the app's port.
        let (SocketAddr::V4(peer), Ok(SocketAddr::V4(target))) = (peer, tcp.local_addr()) else {
            continue;
        };
        let inputs = inputs.clone();
        let (pod, sockets, stats) = (l.pod.clone(), l.sockets.clone(), l.stats.clone());
        let pod_ip = l.pod_ip;
        tokio::spawn(async move {
            plaintext(inputs, pod, pod_ip, sockets, stats, tcp, peer, target).await;
        });
    }
}

/// One plaintext inbound connection: refused under STRICT, else delivered and counted as
/// not mutual TLS.
#[expect(
    clippy::too_many_arguments,
    reason = "one connection's parts, passed once"
)]
async fn plaintext(
    inputs: ProxyInputs,
    pod: Arc<ObjectRef>,
    pod_ip: Ipv4Addr,
    sockets: SocketSource,
    stats: Arc<WorkloadStats>,
    mut client: TcpStream,
    peer: SocketAddrV4,
    target: SocketAddrV4,
) {
    let inbound = &inputs.inbound;
    let routes = inputs.routes.load();
    let mode = routes.inbound_mode(&pod_ip, target.port());
    let protocol = routes.endpoint_protocol(&target);
    let mut labels = TcpLabels {
        reporter: Reporter::Destination,
        source: routes.workload(peer.ip()).cloned(),
        destination: routes.workload(&pod_ip).cloned(),
        service: routes.service_of_endpoint(&target).cloned(),
        flags: ResponseFlags::None,
        source_principal: None,
        destination_principal: routes.identity(&pod_ip).cloned(),
        mutual_tls: false,
    };
    let log = LogEntry::begin(&routes, peer, target);
    // The kubelet probes pods from their node: Istio ambient exempts its health checks from
    // STRICT and from AuthorizationPolicy, and so do we, for connections from the node's own
    // addresses.
    let from_node = inputs.node_addresses.contains(peer.ip());
    let conn = Connection {
        source_ip: *peer.ip(),
        peer: None,
        destination_ip: pod_ip,
        destination_port: target.port(),
    };
    let stage = if protocol.is_http() {
        Stage::HttpConnection
    } else {
        Stage::Connection
    };
    let authorized = if from_node {
        Ok(())
    } else {
        routes.authorize(&pod_ip, &conn, stage)
    };
    drop(routes);
    if mode == MtlsMode::Strict && from_node {
        let n = inbound.node_probes.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            info!(pod = %pod, %peer, %target,
                "letting plaintext from this node through under STRICT (kubelet probes); logged once");
        }
    } else if mode == MtlsMode::Strict {
        let refused = inbound.plaintext_refused.fetch_add(1, Ordering::Relaxed);
        if refused < 100 || refused.is_multiple_of(1000) {
            warn!(pod = %pod, %peer, %target, refused = refused + 1,
                "refused a plaintext connection: PeerAuthentication is STRICT");
        }
        if let Err(e) = client.set_zero_linger() {
            debug!(error = %e, "cannot set SO_LINGER 0");
        }
        return;
    }
    if let Err(denied) = authorized {
        log_denied(inbound, &pod, peer, None, target, &denied);
        if let Err(e) = client.set_zero_linger() {
            debug!(error = %e, "cannot set SO_LINGER 0");
        }
        return;
    }
    inbound.plaintext_accepted.fetch_add(1, Ordering::Relaxed);
    let mut app = match deliver(&sockets, *peer.ip(), target, inputs.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = %pod, %peer, %target, error = %e, "cannot reach the app, resetting the client");
            labels.flags = ResponseFlags::UpstreamConnectFailure;
            let counters = inputs.metrics.tcp(&labels);
            counters.opened.inc();
            counters.closed.inc();
            if let Some(log) = log {
                log.finish(&inputs.access_log, failed(&labels, target, &e));
            }
            let _ = client.set_zero_linger();
            return;
        }
    };
    stats.inbound_connections.fetch_add(1, Ordering::Relaxed);
    stats.inbound_active.fetch_add(1, Ordering::Relaxed);
    let open = inputs.connections.register(ConnInfo {
        pod: pod.clone(),
        direction: Direction::Inbound,
        protocol: Protocol::Tcp,
        client: peer.into(),
        destination: target.into(),
        upstream: target.into(),
        peer_identity: None,
        started: std::time::SystemTime::now(),
        progress: Progress::default(),
        // Node probes are exempt from policy: nothing to re-check.
        revoke: (!protocol.is_http() && !from_node).then(tokio::sync::Notify::new),
        last_series: Default::default(),
    });
    if protocol.is_http() {
        // Each request is recorded by the HTTP layer; the connection has no TCP metrics.
        let delivered = super::http::inbound::Delivered {
            inputs: inputs.clone(),
            pod,
            peer,
            target,
            protocol,
            labels,
            sockets,
            app,
            listed: open.info.clone(),
        };
        super::http::inbound::serve(delivered, client).await;
        drop(open);
        stats.inbound_active.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let plain = Framing::default();
    let r = relay_recorded(
        &inputs,
        &mut client,
        plain,
        &mut app,
        open,
        &labels,
        target,
        log,
    )
    .await;
    if let Some(e) = &r.error {
        debug!(pod = %pod, %peer, %target, error = %e, "plaintext inbound ended with an error");
    }
    stats.inbound_active.fetch_sub(1, Ordering::Relaxed);
}

/// Relays a delivered TCP connection (a plaintext one or an HBONE stream) to the app until
/// either side ends or policy revokes it, counting it in the TCP metrics and the access log.
#[expect(
    clippy::too_many_arguments,
    reason = "one connection's parts, passed once from each accept path"
)]
async fn relay_recorded<A>(
    inputs: &ProxyInputs,
    client: &mut A,
    framing: Framing,
    app: &mut TcpStream,
    open: Registered,
    labels: &TcpLabels,
    target: SocketAddrV4,
    log: Option<LogEntry>,
) -> Relayed
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let counters = inputs.metrics.tcp(labels);
    counters.opened.inc();
    let info = &open.info;
    let r = relay_revocable(
        client,
        app,
        inputs.buffer_size,
        framing,
        &info.progress,
        info.revoke.as_ref(),
    )
    .await;
    drop(open);
    counters.received.inc_by(r.a_to_b);
    counters.sent.inc_by(r.b_to_a);
    if let Some(log) = log {
        log.finish(&inputs.access_log, relayed(labels, target, &r));
    }
    counters.closed.inc();
    r
}

/// Accepts until aborted (unenroll or shutdown); each connection runs in its own task.
pub async fn serve(inputs: ProxyInputs, l: HboneListener) {
    let ctx = Arc::new(Ctx {
        inputs,
        pod: l.pod,
        pod_ip: l.pod_ip,
        trust_domain: l.trust_domain,
        sockets: l.sockets,
        stats: l.stats,
    });
    loop {
        let (tcp, peer) = match l.listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %ctx.pod, error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(peer) = peer else { continue };
        tokio::spawn(after_ready(connection(
            ctx.clone(),
            l.tls.clone(),
            tcp,
            peer,
        )));
    }
}

struct Ctx {
    inputs: ProxyInputs,
    pod: Arc<ObjectRef>,
    pod_ip: Ipv4Addr,
    trust_domain: Arc<str>,
    sockets: SocketSource,
    stats: Arc<WorkloadStats>,
}

/// One mutual-TLS connection from a peer agent.
async fn connection(ctx: Arc<Ctx>, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddrV4) {
    let inbound = &ctx.inputs.inbound;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            inbound.tls_refused.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %ctx.pod, %peer, error = %e, "refused an mTLS connection on 15008");
            return;
        }
        Err(_) => {
            inbound.tls_refused.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %ctx.pod, %peer, "mTLS handshake on 15008 timed out");
            return;
        }
    };
    let source = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
        Some(id) if *id.trust_domain == *ctx.trust_domain => Arc::new(id),
        other => {
            inbound.tls_refused.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %ctx.pod, %peer, identity = ?other.map(|i| i.to_string()),
                trust_domain = %ctx.trust_domain, "refused an mTLS peer outside the trust domain");
            return;
        }
    };
    inbound.tls_accepted.fetch_add(1, Ordering::Relaxed);
    debug!(pod = %ctx.pod, %peer, %source, "mTLS connection accepted");
    // hyper's server defaults where they bound what a peer can make us hold (streams at
    // once, header bytes, streams it makes us reset), with the HBONE windows and send buffer.
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(pod = %ctx.pod, %peer, error = %e, "HTTP/2 handshake on 15008 failed");
            return;
        }
        Err(_) => {
            debug!(pod = %ctx.pod, %peer, "HTTP/2 handshake on 15008 timed out");
            return;
        }
    };
    // Accepting also drives the connection: its frames are read and written here, each
    // stream's bytes in the stream's own task.
    while let Some(accepted) = conn.accept().await {
        match accepted {
            Ok((req, respond)) => {
                tokio::spawn(stream(ctx.clone(), source.clone(), peer, req, respond));
            }
            Err(e) => {
                debug!(pod = %ctx.pod, %peer, error = %e, "HBONE connection ended with an error");
                return;
            }
        }
    }
}

/// Answers a CONNECT stream with `status` and `reason` as its body, ending it.
fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    // Errors here mean the peer is gone; there is no one left to tell.
    if let Ok(mut body) = respond.send_response(resp, reason.is_empty())
        && !reason.is_empty()
    {
        let _ = body.send_data(Bytes::copy_from_slice(reason.as_bytes()), true);
    }
}

/// One CONNECT stream: checks the target, connects to the app, answers, then relays.
async fn stream(
    ctx: Arc<Ctx>,
    source: Arc<Identity>,
    peer: SocketAddrV4,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let inbound = &ctx.inputs.inbound;
    if req.method() != Method::CONNECT {
        inbound.streams_refused.fetch_add(1, Ordering::Relaxed);
        return refuse(
            respond,
            StatusCode::BAD_REQUEST,
            "only CONNECT is served on 15008",
        );
    }
    let target: Option<SocketAddrV4> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let Some(target) = target else {
        inbound.streams_refused.fetch_add(1, Ordering::Relaxed);
        return refuse(
            respond,
            StatusCode::BAD_REQUEST,
            "the :authority must be the destination pod's ip:port",
        );
    };
    if *target.ip() != ctx.pod_ip {
        inbound.streams_refused.fetch_add(1, Ordering::Relaxed);
        warn!(pod = %ctx.pod, %peer, %source, %target, "CONNECT for an address that is not this pod's");
        return refuse(
            respond,
            StatusCode::BAD_REQUEST,
            &format!("{target} is not an address of this pod"),
        );
    }
    let routes = ctx.inputs.routes.load();
    let protocol = routes.endpoint_protocol(&target);
    let conn = Connection {
        source_ip: *peer.ip(),
        peer: Some(&source),
        destination_ip: ctx.pod_ip,
        destination_port: target.port(),
    };
    let stage = if protocol.is_http() {
        Stage::HttpConnection
    } else {
        Stage::Connection
    };
    if let Err(denied) = routes.authorize(&ctx.pod_ip, &conn, stage) {
        log_denied(inbound, &ctx.pod, peer, Some(&source), target, &denied);
        // As ztunnel answers a policy rejection.
        return refuse(respond, StatusCode::UNAUTHORIZED, &format!("{denied}"));
    }
    let mut labels = TcpLabels {
        reporter: Reporter::Destination,
        source: routes.workload(peer.ip()).cloned(),
        destination: routes.workload(&ctx.pod_ip).cloned(),
        service: routes.service_of_endpoint(&target).cloned(),
        flags: ResponseFlags::None,
        source_principal: Some(source.clone()),
        destination_principal: routes.identity(&ctx.pod_ip).cloned(),
        mutual_tls: true,
    };
    let log = LogEntry::begin(&routes, peer, target);
    drop(routes);
    let mut app = match deliver(&ctx.sockets, *peer.ip(), target, ctx.inputs.connect_timeout).await
    {
        Ok(s) => s,
        Err(e) => {
            inbound.streams_refused.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %ctx.pod, %peer, %source, %target, error = %e, "cannot reach the app, answering 503");
            labels.flags = ResponseFlags::UpstreamConnectFailure;
            let counters = ctx.inputs.metrics.tcp(&labels);
            counters.opened.inc();
            counters.closed.inc();
            if let Some(log) = log {
                log.finish(&ctx.inputs.access_log, failed(&labels, target, &e));
            }
            return refuse(
                respond,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("connect to {target} failed: {e}"),
            );
        }
    };
    inbound.streams.fetch_add(1, Ordering::Relaxed);
    let mut tunnel = match respond.send_response(Response::new(()), false) {
        Ok(send) => H2Stream::new(send, req.into_body()),
        Err(e) => {
            info!(pod = %ctx.pod, %peer, %target, error = %e, "CONNECT stream closed before it was answered");
            return;
        }
    };
    ctx.stats.inbound_active.fetch_add(1, Ordering::Relaxed);
    ctx.stats
        .inbound_connections
        .fetch_add(1, Ordering::Relaxed);
    let open = ctx.inputs.connections.register(ConnInfo {
        pod: ctx.pod.clone(),
        direction: Direction::Inbound,
        protocol: Protocol::Hbone,
        client: peer.into(),
        destination: target.into(),
        upstream: target.into(),
        peer_identity: Some(source.clone()),
        started: std::time::SystemTime::now(),
        progress: Progress::default(),
        revoke: (!protocol.is_http()).then(tokio::sync::Notify::new),
        last_series: Default::default(),
    });
    if protocol.is_http() {
        // Each request is recorded by the HTTP layer; the stream has no TCP metrics.
        let delivered = super::http::inbound::Delivered {
            inputs: ctx.inputs.clone(),
            pod: ctx.pod.clone(),
            peer,
            target,
            protocol,
            labels,
            sockets: ctx.sockets.clone(),
            app,
            listed: open.info.clone(),
        };
        super::http::inbound::serve(delivered, tunnel).await;
        drop(open);
        ctx.stats.inbound_active.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    // The app's bytes go back into the tunnel as HTTP/2 DATA frames.
    let framing = Framing {
        into_a: Framing::HBONE,
        into_b: 0,
    };
    let r = relay_recorded(
        &ctx.inputs,
        &mut tunnel,
        framing,
        &mut app,
        open,
        &labels,
        target,
        log,
    )
    .await;
    if let Some(e) = &r.error {
        debug!(pod = %ctx.pod, %peer, %target, error = %e, "inbound stream ended with an error");
    }
    ctx.stats.inbound_active.fetch_sub(1, Ordering::Relaxed);
}

/// The access log's view of a delivered connection: bytes from the peer are received.
fn relayed<'a>(labels: &'a TcpLabels, target: SocketAddrV4, r: &Relayed) -> Ended<'a> {
    Ended {
        labels,
        received: r.a_to_b,
        sent: r.b_to_a,
        upstream_host: Some(target.into()),
        upstream_local: None,
        failure: None,
        http: None,
    }
}

fn failed<'a>(labels: &'a TcpLabels, target: SocketAddrV4, e: &io::Error) -> Ended<'a> {
    Ended {
        labels,
        received: 0,
        sent: 0,
        upstream_host: Some(target.into()),
        upstream_local: None,
        failure: Some(e.to_string()),
        http: None,
    }
}

/// Connects to the app at `target` from inside the pod's namespace, with `client` (the
/// source pod's IP) as the source address: an `IP_TRANSPARENT` socket carrying
/// [`DELIVER_MARK`], whose replies the namespace's policy rule routes back to the agent
/// (see `capture::netns::install_local_delivery`).
pub async fn deliver(
    sockets: &SocketSource,
    client: Ipv4Addr,
    target: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = sockets.socket().await?;
    {
        let s = socket2::SockRef::from(&socket);
        s.set_mark(DELIVER_MARK)?;
        s.set_ip_transparent_v4(true)?;
    }
    crate::capture::netns::bind_address_no_port(&socket)?;
    socket.bind(SocketAddrV4::new(client, 0).into())?;
    match tokio::time::timeout(timeout, socket.connect(target.into())).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}
