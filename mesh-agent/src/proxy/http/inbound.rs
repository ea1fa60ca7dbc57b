//! HTTP at the destination agent. A connection delivered to an enrolled pod's port that
//! declares HTTP (an HBONE stream, or plaintext under PERMISSIVE) is parsed again, so each
//! request is counted and logged by the destination (`reporter="destination"`) with what
//! only the destination knows: whether the connection was mutual TLS and the peer's proven
//! identity. Requests go on to the app over connections opened inside its namespace with the
//! client's IP as source, in the protocol the port declares (HTTP/1.1, or HTTP/2 for `http2`
//! and `grpc`), whatever the peer spoke: the source agent carries requests to meshed pods as
//! HTTP/2 on a connection shared by its client connections.
//!
//! No routing happens here: the source agent routed already. The destination does not retry
//! either; a failure to reach the app is answered as Envoy does (503 `UF`, 503 `UC`).
//! AuthorizationPolicy is checked for each request with its method, path, host and headers;
//! a refused one gets Envoy's 403 `RBAC: access denied` and never reaches the app.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use super::body::{self, Counted, ProxyBody};
use super::upstream::{Connector, PoolSettings, Upstreams};
use super::{CONNECT_FAILURE, Done, RESET, Reply};
use crate::capture::netns::SocketSource;
use crate::config::model::ObjectRef;
use crate::proxy::protocol::AppProtocol;
use crate::proxy::{LogEntry, ProxyInputs};
use crate::telemetry::access_log::{HttpInfo, request_authority};
use crate::telemetry::metrics::{ResponseFlags, TcpLabels};

/// A connection delivered to an HTTP port of an enrolled pod.
pub struct Delivered {
    pub inputs: ProxyInputs,
    pub pod: Arc<ObjectRef>,
    /// The client (source pod IP and port).
    pub peer: SocketAddrV4,
    /// The app's address in the pod.
    pub target: SocketAddrV4,
    /// What the port declares; decides the protocol towards the app.
    pub protocol: AppProtocol,
    /// The connection's labels, reported by the destination.
    pub labels: TcpLabels,
    pub sockets: SocketSource,
    /// The connection to the app opened before the client was answered.
    pub app: TcpStream,
    /// Its entry in `/connections`, whose byte counts each finished request adds to.
    pub listed: Arc<crate::proxy::connections::ConnInfo>,
}

struct Ctx {
    inputs: ProxyInputs,
    pod: Arc<ObjectRef>,
    peer: SocketAddrV4,
    target: SocketAddrV4,
    protocol: AppProtocol,
    labels: TcpLabels,
    upstreams: Upstreams,
    listed: Arc<crate::proxy::connections::ConnInfo>,
}

/// Serves `client` as HTTP/1.1 or HTTP/2 (whichever it speaks) until it closes.
pub async fn serve<IO>(d: Delivered, client: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (pod, peer) = (d.pod.clone(), d.peer);
    let ctx = Arc::new(Ctx {
        upstreams: Upstreams::new(
            Connector::Deliver {
                sockets: d.sockets,
                client: *d.peer.ip(),
                first: std::sync::Mutex::new(Some(d.app)),
            },
            d.inputs.connect_timeout,
        ),
        inputs: d.inputs,
        pod: d.pod,
        peer: d.peer,
        target: d.target,
        protocol: d.protocol,
        labels: d.labels,
        listed: d.listed,
    });
    // Boxed: hyper's HTTP/1 server keeps a heap slot the size of the service's future for
    // the whole connection, idle or not; a request's future is kilobytes, a box 16 bytes.
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        Box::pin(async move { Ok::<_, Infallible>(ctx.request(req).await) })
    });
    let served = super::server()
        .serve_connection_with_upgrades(TokioIo::new(client), service)
        .await;
    if let Err(e) = served {
        debug!(%pod, client = %peer, error = %e, "inbound HTTP connection ended with an error");
    }
}

impl Ctx {
    /// `request_protocol="grpc"`: the port declares gRPC, or the request is gRPC (ports
    /// shared by Services declaring different HTTP flavours).
    fn grpc(&self, headers: &hyper::HeaderMap) -> bool {
        self.protocol == AppProtocol::Grpc
            || headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    }

    /// AuthorizationPolicy for one request (the connection passed its own check).
    fn authorize(
        &self,
        routes: &crate::proxy::RouteTable,
        req: &Request<Incoming>,
    ) -> Result<(), crate::config::authz::Denied> {
        use crate::config::authz::{Connection, HttpRequest, Stage};
        // Nothing to check (and nothing to allocate) without policies. Kubelet probes from
        // the node are exempt, as from STRICT.
        if !routes.has_authorization() || self.inputs.node_addresses.contains(self.peer.ip()) {
            return Ok(());
        }
        let conn = Connection {
            source_ip: *self.peer.ip(),
            peer: self.labels.source_principal.as_deref(),
            destination_ip: *self.target.ip(),
            destination_port: self.target.port(),
        };
        let host = request_authority(req).unwrap_or_default();
        let request = HttpRequest {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: &host,
            headers: req.headers(),
        };
        routes.authorize(self.target.ip(), &conn, Stage::Request(&request))
    }

    /// One request: sent to the app on a kept connection (or a new one), the response
    /// passed back and recorded when its body ends.
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut labels = self.labels.clone();
        let mut grpc = self.grpc(req.headers());
        let app_protocol;
        let (log, trace, authorized) = {
            let routes = self.inputs.routes.load();
            let authorized = self.authorize(&routes, &req);
            // The Service port the client asked for: the one Service sending to this port,
            // or, when several do, the one the request's authority names.
            let mut service = routes.endpoint_service(&self.target);
            if service.is_none()
                && let Some(authority) = request_authority(&req)
            {
                service = routes.endpoint_service_by_authority(&self.target, &authority);
            }
            if let Some(s) = service {
                labels.service = Some(s.meta.clone());
                grpc |= s.protocol == AppProtocol::Grpc;
            }
            app_protocol = service.map_or(self.protocol, |s| s.protocol);
            let port = service.map_or(self.target.port(), |s| s.address.port());
            let trace = super::trace_hop(&routes, &mut req, port, self.peer, self.target);
            let log = LogEntry::begin(&routes, self.peer, self.target);
            (log, trace, authorized)
        };
        let info = log.as_ref().map(|_| HttpInfo::of_request(&req));
        let done = Done {
            labels,
            started,
            log,
            info,
            trace,
            listed: self.listed.clone(),
            deadline: None,
        };
        if let Err(denied) = authorized {
            let source = self.labels.source_principal.as_deref();
            let inbound = &self.inputs.inbound;
            crate::proxy::inbound::log_denied(
                inbound,
                &self.pod,
                self.peer,
                source,
                self.target,
                &denied,
            );
            let mut reply = Reply::new(
                StatusCode::FORBIDDEN,
                ResponseFlags::None,
                "RBAC: access denied",
            );
            reply.failure = Some(denied.to_string());
            return super::own_reply(&self.inputs, grpc, self.target, done, reply);
        }
        let version = req.version();
        // The app gets the protocol its port declares (the source agent may carry HTTP/1.1
        // requests as HTTP/2 on a shared connection).
        let h2 = app_protocol.upstream_h2();
        let upgrade = (version == Version::HTTP_11 && !h2)
            .then(|| super::upgrade_headers(req.headers()))
            .flatten();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        super::prepare_request(&mut req, h2);
        if let Some((connection, proto)) = upgrade {
            req.headers_mut().insert(header::CONNECTION, connection);
            req.headers_mut().insert(header::UPGRADE, proto);
        }
        let (parts, body) = req.into_parts();
        let body = Counted::new(Either::Left(super::replay::Tee::new(body, None)));
        let request_bytes = body.counter();
        let req = Request::from_parts(parts, body);

        let mut sender = match self
            .upstreams
            .get(
                &self.pod,
                self.target,
                None,
                h2,
                false,
                PoolSettings::default(),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(pod = %self.pod, client = %self.peer, error = %e, "cannot reach the app");
                let mut reply =
                    Reply::unavailable(ResponseFlags::UpstreamConnectFailure, CONNECT_FAILURE);
                reply.upstream = Some((self.target, e.to_string()));
                return super::own_reply(&self.inputs, grpc, self.target, done, reply);
            }
        };
        let mut resp = match sender.send(req).await {
            Ok(r) => r,
            Err(e) => {
                // A client body that broke off is the client's fault, not the app's.
                let reply = if body::failed(&request_bytes) {
                    let mut r = Reply::new(
                        StatusCode::BAD_REQUEST,
                        ResponseFlags::DownstreamProtocolError,
                        "Bad Request",
                    );
                    r.failure = Some("invalid request body".into());
                    r
                } else {
                    debug!(pod = %self.pod, client = %self.peer, error = %e, "the app reset before the response");
                    let mut r =
                        Reply::unavailable(ResponseFlags::UpstreamConnectionTermination, RESET);
                    r.upstream = Some((self.target, e.to_string()));
                    r
                };
                return super::own_reply(&self.inputs, grpc, self.target, done, reply);
            }
        };
        match client_upgrade {
            Some(client) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The app connection now carries the upgraded stream: not kept.
                drop(sender);
                super::join_upgrade(
                    client,
                    &mut resp,
                    self.pod.clone(),
                    self.target,
                    self.inputs.buffer_size,
                );
            }
            _ => self.upstreams.put_back(self.target, sender, None),
        }
        super::upstream_reply(
            &self.inputs,
            resp,
            version,
            grpc,
            done,
            request_bytes,
            self.target,
            &[],
        )
    }
}
