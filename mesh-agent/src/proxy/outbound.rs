//! Outbound: a pod's captured connection, from its accept on 127.0.0.1:15001 inside the pod's
//! namespace to the upstream socket made in that same namespace, and the bytes in between.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::connections::{ConnInfo, Direction, Progress, Protocol};
use super::hbone::pool::Pool;
use super::http::HttpConn;
use super::protocol::{self, AppProtocol, Sniffed};
use super::routing;
use super::{Ended, LogEntry, ProxyInputs, Target, WorkloadStats};
use crate::capture::OrigDstTable;
use crate::capture::netns::SocketSource;
use crate::config::model::ObjectRef;
use crate::identity::Identity;
use crate::telemetry::metrics::{ResponseFlags, TcpLabels};

/// What one enrolled pod's outbound listener needs.
pub struct OutboundListener {
    pub pod: Arc<ObjectRef>,
    /// The pod's IP, for logs: the address the upstream sees as the source.
    pub pod_ip: Option<std::net::Ipv4Addr>,
    pub netns_cookie: u64,
    pub listener: TcpListener,
    pub orig_dst: OrigDstTable,
    pub sockets: SocketSource,
    pub stats: Arc<WorkloadStats>,
    /// With mutual TLS on: the pod's identity and its HBONE pool, through which connections
    /// to meshed pods go.
    pub hbone: Option<Hbone>,
}

/// A pod's side of HBONE.
#[derive(Clone)]
pub struct Hbone {
    pub identity: Arc<Identity>,
    pub pool: Arc<Pool>,
}

/// Accepts until the task is aborted (unenroll or shutdown). Each connection runs in its own
/// task, so aborting this loop leaves established connections flowing.
pub async fn serve(inputs: ProxyInputs, mut l: OutboundListener) {
    loop {
        let (client, peer) = match l.listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(pod = %l.pod, error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        inputs.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let SocketAddr::V4(peer) = peer else {
            debug!(pod = %l.pod, %peer, "IPv6 peer on the IPv4 outbound listener, closing");
            continue;
        };
        let Some(orig) = l.orig_dst.take(l.netns_cookie, peer) else {
            // Fail closed: without the original destination there is nowhere right to go.
            inputs.stats.no_orig_dst.fetch_add(1, Ordering::Relaxed);
            warn!(pod = %l.pod, client = %peer, "no original destination recorded for this connection, closing it");
            reset(client);
            continue;
        };
        // Count the connection as open before its task runs, so a burst cannot overshoot.
        let open = inputs.stats.active.fetch_add(1, Ordering::Relaxed);
        if open >= inputs.max_connections {
            inputs.stats.active.fetch_sub(1, Ordering::Relaxed);
            let refused = inputs.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            // Logged for the first refusal and then every 1000th, not once per connection.
            if refused.is_multiple_of(1000) {
                warn!(pod = %l.pod, client = %peer, limit = inputs.max_connections, refused = refused + 1,
                    "connection limit reached (--max-connections), resetting new connections");
            }
            reset(client);
            continue;
        }
        let dst = SocketAddrV4::new(std::net::Ipv4Addr::from(orig.ip4.to_ne_bytes()), orig.port);
        let conn = Connection {
            inputs: inputs.clone(),
            pod: l.pod.clone(),
            src: l.pod_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            peer,
            dst,
            sockets: l.sockets.clone(),
            stats: l.stats.clone(),
            hbone: l.hbone.clone(),
        };
        tokio::spawn(conn.run(client));
    }
}

struct Connection {
    inputs: ProxyInputs,
    /// Shared with the listener: no per-connection copy of the names.
    pod: Arc<ObjectRef>,
    /// The pod's IP (the source the upstream sees), for logs.
    src: std::net::Ipv4Addr,
    peer: SocketAddrV4,
    dst: SocketAddrV4,
    sockets: SocketSource,
    stats: Arc<WorkloadStats>,
    hbone: Option<Hbone>,
}

/// Where a connection went, for its access log entry.
struct Upstream {
    host: SocketAddrV4,
    local: Option<SocketAddr>,
}

/// How long an undeclared port waits for the client's first bytes before treating the
/// connection as TCP (server-first protocols send nothing until the server speaks).
const PROTOCOL_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

impl Connection {
    async fn run(self, client: TcpStream) {
        // An undeclared port: the client's first bytes say whether it speaks HTTP.
        let detect = matches!(
            self.inputs.routes.load().target(self.dst),
            Target::Service(r) if r.protocol == AppProtocol::Detect
        );
        let sniffed = match detect {
            true => match protocol::sniff(&client, PROTOCOL_DETECTION_TIMEOUT).await {
                Sniffed::Tcp => None,
                http => Some(http),
            },
            false => None,
        };
        self.run_as(client, sniffed).await;
    }

    /// `sniffed`: the HTTP version an undeclared port's client spoke, if it did.
    async fn run_as(self, client: TcpStream, sniffed: Option<Sniffed>) {
        let proxy_stats = &self.inputs.stats;
        self.stats
            .outbound_connections
            .fetch_add(1, Ordering::Relaxed);
        self.stats.outbound_active.fetch_add(1, Ordering::Relaxed);

        debug!(pod = %self.pod, client = %self.peer, dst = %self.dst, "captured connection");
        let routes = self.inputs.routes.load();
        // The client's address as the pod has it (the accepted socket is on loopback).
        let downstream = SocketAddrV4::new(self.src, self.peer.port());
        let log = LogEntry::begin(&routes, downstream, self.dst);
        let mut labels = TcpLabels::source();
        labels.source = routes.workload(&self.src).cloned();
        let (upstream_addr, service, pooled) = match routes.target(self.dst) {
            Target::Service(route) if route.protocol.is_http() => {
                route.stats.connections.fetch_add(1, Ordering::Relaxed);
                let protocol = route.protocol;
                drop(routes);
                self.serve_http(client, protocol).await;
                return;
            }
            // An undeclared port whose client spoke HTTP first.
            Target::Service(route)
                if route.protocol == AppProtocol::Detect && sniffed.is_some() =>
            {
                route.stats.connections.fetch_add(1, Ordering::Relaxed);
                drop(routes);
                let protocol = match sniffed {
                    Some(Sniffed::Http2) => AppProtocol::Http2,
                    _ => AppProtocol::Http,
                };
                self.serve_http(client, protocol).await;
                return;
            }
            Target::Service(route) => {
                route.stats.connections.fetch_add(1, Ordering::Relaxed);
                labels.service = Some(route.meta.clone());
                // A VirtualService's `tcp[]` route, else the Service's own endpoints; either
                // with its DestinationRule's policy.
                let routed = route
                    .tcp
                    .as_ref()
                    .and_then(|t| t.route(self.dst.port(), routes.pod(&self.src)));
                let backend = match routed.map(|t| &t.backend) {
                    Some(Ok(backend)) => Some(backend),
                    Some(Err(e)) => {
                        warn!(pod = %self.pod, dst = %self.dst, service = %route.service, reason = %e,
                            "the VirtualService's TCP route has no backend");
                        None
                    }
                    None => route.tcp_backend.as_ref(),
                };
                if let Some(b) = backend {
                    labels.service = Some(b.meta.clone());
                }
                let picked = match backend.map(|b| Pooled::take(b, self.src)) {
                    Some(Err(Overflow { max })) => {
                        warn!(pod = %self.pod, src = %self.src, dst = %self.dst, service = %route.service,
                            max_connections = max,
                            "DestinationRule connectionPool.tcp.maxConnections reached, resetting the client");
                        labels.flags = ResponseFlags::UpstreamOverflow;
                        self.finish_error(client, &labels, log, None, None);
                        return;
                    }
                    Some(Ok(pooled)) => pooled,
                    None => None,
                };
                match picked {
                    Some(pooled) => (pooled.addr, Some(route.stats.clone()), Some(pooled)),
                    None => {
                        route.stats.no_endpoints.fetch_add(1, Ordering::Relaxed);
                        warn!(pod = %self.pod, src = %self.src, dst = %self.dst, service = %route.service,
                            "no ready endpoint for the service, resetting the client");
                        labels.flags = ResponseFlags::NoHealthyUpstream;
                        self.finish_error(client, &labels, log, None, None);
                        return;
                    }
                }
            }
            Target::Passthrough => (self.dst, None, None),
        };
        // The DestinationRule's connectTimeout, else the agent's.
        let connect_timeout = pooled
            .as_ref()
            .and_then(|p| p.backend.policy.connection_pool.connect_timeout)
            .unwrap_or(self.inputs.connect_timeout);
        let idle_timeout = pooled.as_ref().and_then(Pooled::idle_timeout);
        labels.destination = routes.workload(upstream_addr.ip()).cloned();
        // A meshed destination is reached through its agent, over mutual TLS.
        let tunnel_to = match &self.hbone {
            Some(h) => {
                labels.source_principal = Some(h.identity.clone());
                routes
                    .identity(upstream_addr.ip())
                    .map(|id| (h.pool.clone(), id.clone()))
            }
            None => None,
        };
        drop(routes);

        if let Some((pool, identity)) = tunnel_to {
            labels.destination_principal = Some(identity.clone());
            // The TCP paths' futures are boxed (here and below): inline they would make every
            // connection's task, HTTP ones included, as large as the largest of them (about
            // 7 KiB against the HTTP path's 2), kept for as long as a keep-alive client idles.
            let connected =
                Box::pin(pool.connect_within(&identity, upstream_addr, connect_timeout)).await;
            if let Some(p) = &pooled {
                p.observe(connected.is_ok());
            }
            match connected {
                Ok(mut tunnel) => {
                    self.stats.outbound_hbone.fetch_add(1, Ordering::Relaxed);
                    let upstream = Upstream {
                        host: upstream_addr,
                        local: None,
                    };
                    let relay =
                        self.relay(client, &mut tunnel.io, &labels, upstream, log, idle_timeout);
                    Box::pin(relay).await;
                }
                Err(e) => {
                    if let Some(s) = &service {
                        s.connect_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    proxy_stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(pod = %self.pod, src = %self.src, dst = %self.dst, upstream = %upstream_addr,
                        via = "HBONE", %identity, error = %e, "upstream connect failed, resetting the client");
                    labels.flags = ResponseFlags::UpstreamConnectFailure;
                    let reason = Some(e.to_string());
                    self.finish_error(client, &labels, log, Some(upstream_addr), reason);
                }
            }
            return;
        }

        let connected = Box::pin(self.connect(upstream_addr, connect_timeout)).await;
        if let Some(p) = &pooled {
            p.observe(connected.is_ok());
        }
        let mut upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                if let Some(s) = &service {
                    s.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
                proxy_stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                warn!(pod = %self.pod, src = %self.src, dst = %self.dst, upstream = %upstream_addr,
                    error = %e, "upstream connect failed, resetting the client");
                labels.flags = ResponseFlags::UpstreamConnectFailure;
                let reason = Some(e.to_string());
                self.finish_error(client, &labels, log, Some(upstream_addr), reason);
                return;
            }
        };
        let target = Upstream {
            host: upstream_addr,
            local: upstream.local_addr().ok(),
        };
        Box::pin(self.relay(client, &mut upstream, &labels, target, log, idle_timeout)).await;
        drop(pooled);
    }

    /// Moves bytes both ways until both directions are done, then counts the connection.
    async fn relay<U>(
        &self,
        mut client: TcpStream,
        upstream: &mut U,
        labels: &TcpLabels,
        target: Upstream,
        log: Option<LogEntry>,
        idle_timeout: Option<Duration>,
    ) where
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        let proxy_stats = &self.inputs.stats;
        let upstream_addr = target.host;
        let counters = self.inputs.metrics.tcp(labels);
        counters.opened.inc();
        debug!(pod = %self.pod, client = %self.peer, dst = %self.dst, upstream = %upstream_addr, "proxying");
        let size = self.inputs.buffer_size;
        // Half-close is honoured: EOF on one side shuts down the write side of the other, and
        // the reverse direction keeps flowing until its own EOF.
        let hbone = labels.destination_principal.is_some();
        let open = self.inputs.connections.register(ConnInfo {
            pod: self.pod.clone(),
            direction: Direction::Outbound,
            protocol: if hbone {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            client: SocketAddrV4::new(self.src, self.peer.port()).into(),
            destination: self.dst.into(),
            upstream: upstream_addr.into(),
            peer_identity: labels.destination_principal.clone(),
            started: std::time::SystemTime::now(),
            progress: Progress::default(),
            revoke: None,
            last_series: Default::default(),
        });
        let ends = super::relay::Ends {
            revoked: None,
            idle_timeout,
        };
        let framing = super::relay::Framing {
            into_a: 0,
            into_b: if hbone {
                super::relay::Framing::HBONE
            } else {
                0
            },
        };
        let r = super::relay::relay_until(
            &mut client,
            upstream,
            size,
            framing,
            &open.info.progress,
            ends,
        )
        .await;
        if let Some(e) = r
            .error
            .as_ref()
            .filter(|e| e.kind() == io::ErrorKind::TimedOut)
        {
            info!(pod = %self.pod, client = %self.peer, dst = %self.dst, upstream = %upstream_addr, reason = %e,
                "closing an idle connection");
        }
        drop(open);
        let (to_upstream, to_client) = (r.a_to_b, r.b_to_a);
        proxy_stats
            .bytes_sent
            .fetch_add(to_upstream, Ordering::Relaxed);
        proxy_stats
            .bytes_received
            .fetch_add(to_client, Ordering::Relaxed);
        // Istio: "received" is the request direction, "sent" the response.
        counters.received.inc_by(to_upstream);
        counters.sent.inc_by(to_client);
        match r.error {
            None => {
                debug!(pod = %self.pod, client = %self.peer, upstream = %upstream_addr, to_upstream, to_client, "closed")
            }
            Some(e) => {
                debug!(pod = %self.pod, client = %self.peer, upstream = %upstream_addr, to_upstream, to_client, error = %e, "connection ended with an error")
            }
        }
        counters.closed.inc();
        if let Some(log) = log {
            log.finish(
                &self.inputs.access_log,
                Ended {
                    labels,
                    received: to_upstream,
                    sent: to_client,
                    upstream_host: Some(upstream_addr.into()),
                    upstream_local: target.local,
                    failure: None,
                    http: None,
                },
            );
        }
        proxy_stats.completed.fetch_add(1, Ordering::Relaxed);
        self.done();
    }

    /// A Service port that declares HTTP: requests are routed one by one.
    async fn serve_http(&self, client: TcpStream, protocol: AppProtocol) {
        let client_addr = SocketAddrV4::new(self.src, self.peer.port());
        let open = self.inputs.connections.register(ConnInfo {
            pod: self.pod.clone(),
            direction: Direction::Outbound,
            protocol: Protocol::Http,
            client: client_addr.into(),
            destination: self.dst.into(),
            upstream: self.dst.into(),
            peer_identity: None,
            started: std::time::SystemTime::now(),
            progress: Progress::default(),
            revoke: None,
            last_series: Default::default(),
        });
        let conn = HttpConn {
            listed: open.info.clone(),
            inputs: self.inputs.clone(),
            pod: self.pod.clone(),
            src: self.src,
            client: SocketAddrV4::new(self.src, self.peer.port()),
            dst: self.dst,
            protocol,
            sockets: self.sockets.clone(),
            hbone: self.hbone.clone(),
            stats: self.stats.clone(),
        };
        super::http::serve(conn, client).await;
        drop(open);
        self.inputs.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.done();
    }

    async fn connect(&self, addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        let socket = self.sockets.socket().await?;
        match tokio::time::timeout(timeout, socket.connect(addr.into())).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(timeout)),
        }
    }

    /// A connection that never reached an upstream: counted opened and closed with its
    /// response flag, as Envoy reports it, then reset.
    fn finish_error(
        &self,
        client: TcpStream,
        labels: &TcpLabels,
        log: Option<LogEntry>,
        upstream: Option<SocketAddrV4>,
        failure: Option<String>,
    ) {
        let counters = self.inputs.metrics.tcp(labels);
        counters.opened.inc();
        counters.closed.inc();
        if let Some(log) = log {
            let end = Ended {
                labels,
                received: 0,
                sent: 0,
                upstream_host: upstream.map(Into::into),
                upstream_local: None,
                failure,
                http: None,
            };
            log.finish(&self.inputs.access_log, end);
        }
        self.stats.outbound_errors.fetch_add(1, Ordering::Relaxed);
        reset(client);
        self.inputs.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.done();
    }

    fn done(&self) {
        self.inputs.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.stats.outbound_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes with RST, so the client learns at once that its connection failed.
fn reset(client: TcpStream) {
    if let Err(e) = client.set_zero_linger() {
        info!(error = %e, "cannot set SO_LINGER 0, closing normally");
    }
    drop(client);
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connect timed out after {after:?}"),
    )
}

/// A TCP connection's place in its backend's connection pool: counted against
/// `connectionPool.tcp.maxConnections` and as its endpoint's load (LEAST_REQUEST balances
/// connections on TCP ports) until dropped.
struct Pooled {
    backend: Arc<routing::Backend>,
    endpoint: Arc<routing::EndpointState>,
    addr: SocketAddrV4,
}

/// `maxConnections` connections are open to the backend already.
struct Overflow {
    max: u32,
}

impl Pooled {
    /// An endpoint by the backend's load balancer (source-IP hashing included); `Ok(None)`
    /// when no endpoint is usable.
    fn take(
        backend: &Arc<routing::Backend>,
        src: std::net::Ipv4Addr,
    ) -> Result<Option<Pooled>, Overflow> {
        let state = &backend.state;
        let open = state.in_flight.fetch_add(1, Ordering::Relaxed);
        let release = || state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(max) = backend.policy.connection_pool.max_connections
            && open >= max
        {
            release();
            state.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(Overflow { max });
        }
        let hash = routing::source_ip_hash(&backend.policy, src);
        let Some(picked) = backend.pick(hash, &[]) else {
            release();
            return Ok(None);
        };
        picked.state.active.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Pooled {
            backend: backend.clone(),
            endpoint: picked.state.clone(),
            addr: picked.endpoint.addr,
        }))
    }

    /// `connectionPool.tcp.idleTimeout`; `0s` turns it off, as in Istio.
    fn idle_timeout(&self) -> Option<Duration> {
        self.backend
            .policy
            .connection_pool
            .tcp_idle_timeout
            .filter(|t| !t.is_zero())
    }

    /// Outlier detection: a failed connect counts as a gateway error, a connect resets the
    /// endpoint's run of errors (Envoy's TCP rule).
    fn observe(&self, connected: bool) {
        let status = connected.then_some(200);
        self.backend.observe(&self.endpoint, status);
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.backend.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}
