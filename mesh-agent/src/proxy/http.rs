//! HTTP at the source agent: a captured connection to a Service port that declares HTTP
//! (`appProtocol`, or a port name `http*`, `http2*`, `grpc*`) is served as HTTP/1.1 or
//! h2c (prior knowledge), and each request is balanced on its own over the Service's
//! endpoints, then sent over HBONE (or TCP to pods outside the mesh) in HTTP/1.1, or HTTP/2
//! for `http2`/`grpc` ports.
//!
//! Requests to meshed pods share one HTTP/2 connection per (client pod, destination pod)
//! and data-path thread (`shared`); other upstream connections belong to the client
//! connection that opened them, so no lock is shared across threads. Errors are answered as
//! Envoy answers them, with
//! the response flag kept for metrics and the access log: no endpoint 503 `UH`, connect
//! failure 503 `UF`, upstream reset before the response 503 `UC`.

mod body;
mod forward;
mod h2_upstream;
pub mod inbound;
mod replay;
mod rules;
mod shared;
mod upstream;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use self::body::ProxyBody;
use self::upstream::Upstreams;
use super::outbound::Hbone;
use super::protocol::AppProtocol;
use super::routing::{self, RequestHead, Routed};
use super::{ProxyInputs, Target, WorkloadStats};
use crate::capture::netns::SocketSource;
use crate::config::model::ObjectRef;
use crate::config::routing::HttpAction;
use crate::telemetry::access_log::{HttpInfo, request_authority};
use crate::telemetry::metrics::{HttpLabels, ResponseFlags, TcpLabels};
use crate::telemetry::trace;

/// One client connection served as HTTP.
pub struct HttpConn {
    pub inputs: ProxyInputs,
    pub pod: Arc<ObjectRef>,
    /// The pod's IP.
    pub src: Ipv4Addr,
    /// The client as the pod has it (pod IP and the client's port).
    pub client: SocketAddrV4,
    /// The Service address the client connected to.
    pub dst: SocketAddrV4,
    pub protocol: AppProtocol,
    pub sockets: SocketSource,
    pub hbone: Option<Hbone>,
    pub stats: Arc<WorkloadStats>,
    /// Its entry in `/connections`, whose byte counts each finished request adds to.
    pub listed: Arc<super::connections::ConnInfo>,
}

/// Serves the connection until the client closes it.
pub async fn serve(conn: HttpConn, client: TcpStream) {
    let pod = conn.pod.clone();
    let peer = conn.client;
    let ctx = Arc::new(Ctx {
        upstreams: Upstreams::new(
            upstream::Connector::Source {
                sockets: conn.sockets.clone(),
                hbone: conn.hbone.clone(),
                source: conn.src,
            },
            conn.inputs.connect_timeout,
        ),
        conn,
    });
    // Boxed: hyper's HTTP/1 server keeps a heap slot the size of the service's future for
    // the whole connection, idle or not; a request's future is kilobytes, a box 16 bytes.
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        Box::pin(async move { Ok::<_, Infallible>(ctx.request(req).await) })
    });
    if let Err(e) = serve_tcp(client, service).await {
        debug!(%pod, client = %peer, error = %e, "HTTP connection ended with an error");
    }
}

/// The h2c prior-knowledge preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a client's TCP connection as h2c if it opens with the HTTP/2 preface, else as
/// HTTP/1.1 with upgrades, with [`server`]'s settings.
///
/// hyper-util's auto builder decides by reading the first bytes through a rewinding wrapper:
/// hyper's first read then returns those bytes alone, its read buffer doubles to 16 KiB and
/// every keep-alive connection keeps that. Peeking at the socket decides the same with no
/// read, and holds nothing while the client has not spoken yet.
pub(crate) async fn serve_tcp<S, B>(client: TcpStream, service: S) -> Result<(), hyper::Error>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    let h2 = match opens_with_h2_preface(&client).await {
        Ok(h2) => h2,
        // The socket failed before the first byte: nothing to serve, nothing to answer.
        Err(e) => {
            debug!(error = %e, "HTTP client connection failed before its first request");
            return Ok(());
        }
    };
    let io = TokioIo::new(client);
    if h2 {
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.max_header_list_size(MAX_HEADER_BYTES as u32);
        h2.serve_connection(io, service).await
    } else {
        hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    }
}

/// Whether the client's first bytes are the HTTP/2 preface, by peeking (nothing is consumed).
/// False as soon as a byte differs, and at EOF (HTTP/1 then sees the EOF itself).
async fn opens_with_h2_preface(client: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = client.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far: a peek would return at once with the same bytes, so
        // give the rest a moment to arrive (clients send the preface in one write).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// The HTTP server both agents serve connections with: HTTP/1.1 or h2c, whichever the
/// client speaks, with Envoy's default limit on request headers (60 KiB; beyond it, 431 and
/// no request).
pub(crate) fn server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

struct Ctx {
    conn: HttpConn,
    upstreams: Upstreams,
}

/// The most request header bytes a client may send.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Envoy's bodies for its own error responses.
const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

impl Ctx {
    /// One request: routed by the VirtualService in force (or straight to the Service),
    /// then answered by the agent (404 `NR`, redirect, direct response, fault) or forwarded.
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let c = &self.conn;
        let routes = c.inputs.routes.load_full();
        let mut labels = TcpLabels::source();
        labels.source = routes.workload(&c.src).cloned();
        if let Some(h) = &c.hbone {
            labels.source_principal = Some(h.identity.clone());
        }
        let trace = trace_hop(&routes, &mut req, c.dst.port(), c.client, c.dst);
        let log = super::LogEntry::begin(&routes, c.client, c.dst);
        let info = log.as_ref().map(|_| HttpInfo::of_request(&req));
        let mut done = Done {
            labels,
            started,
            log,
            info,
            trace,
            listed: c.listed.clone(),
            deadline: None,
        };
        // The Service went away while the client kept its connection.
        let Target::Service(service) = routes.target(c.dst) else {
            return self.local_reply(
                done,
                Reply::unavailable(ResponseFlags::NoHealthyUpstream, NO_HEALTHY_UPSTREAM),
            );
        };
        done.labels.service = Some(service.meta.clone());
        let Some(router) = &service.http else {
            return self.local_reply(
                done,
                Reply::unavailable(ResponseFlags::NoHealthyUpstream, NO_HEALTHY_UPSTREAM),
            );
        };
        let authority = request_authority(&req);
        let head = RequestHead {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            authority: authority.as_deref(),
            headers: req.headers(),
            port: c.dst.port(),
            source: routes.pod(&c.src),
        };
        let (rule, target) = match router.route(&head) {
            Routed::Default(target) => (None, target.clone()),
            Routed::NoRoute => {
                return self.local_reply(
                    done,
                    Reply::new(StatusCode::NOT_FOUND, ResponseFlags::NoRouteFound, ""),
                );
            }
            Routed::Rule(rule) => match &rule.rule.action {
                HttpAction::Route(_) => match rule.pick() {
                    Some(t) => (Some(rule.clone()), t.clone()),
                    None => {
                        return self.local_reply(
                            done,
                            Reply::unavailable(ResponseFlags::NoClusterFound, NO_HEALTHY_UPSTREAM),
                        );
                    }
                },
                HttpAction::Redirect(redirect) => {
                    let reply = rules::redirect(redirect, &req, authority.as_deref(), c.dst.port());
                    return self.local_reply(done, reply);
                }
                HttpAction::DirectResponse(d) => {
                    let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
                    let mut reply = Reply::new(status, ResponseFlags::None, "");
                    reply.body = d.body.clone();
                    reply.headers = rule.rule.headers.response.clone();
                    return self.local_reply(done, reply);
                }
            },
        };
        let backend = match &target.backend {
            Ok(b) => b.clone(),
            Err(e) => {
                debug!(pod = %c.pod, service = %service.service, reason = %e, "route has no backend");
                let mut reply =
                    Reply::unavailable(ResponseFlags::NoClusterFound, NO_HEALTHY_UPSTREAM);
                reply.failure = Some(e.to_string());
                return self.local_reply(done, reply);
            }
        };
        // Istio labels requests with the Service they were routed to.
        done.labels.service = Some(backend.meta.clone());
        let hash = routing::hash_key(&backend.policy, &head, c.src);
        // CORS: preflights are answered here, allowed origins get their response headers.
        let mut cors_headers = None;
        if let Some(cors) = rule.as_ref().and_then(|r| r.rule.cors.as_ref()) {
            match rules::cors(cors, &req) {
                rules::Cors::Preflight(reply) => return self.local_reply(done, reply),
                rules::Cors::Allowed(ops) => cors_headers = Some(ops),
                rules::Cors::Plain => {}
            }
        }
        if let Some(rule) = &rule
            && let Some(fault) = &rule.rule.fault
            && let Some(reply) = rules::fault(fault, &mut done).await
        {
            return self.local_reply(done, reply);
        }
        if let Some(rule) = &rule {
            rules::rewrite_request(&mut req, &rule.rule);
            rules::apply(&rule.rule.headers.request, req.headers_mut());
        }
        rules::apply(&target.headers.request, req.headers_mut());
        if let Some(rule) = &rule {
            for (mirror, percent) in &rule.mirrors {
                if rules::hit(*percent) {
                    self.mirror(&req, mirror, &routes);
                }
            }
        }
        let plan = forward::Plan {
            routes,
            backend,
            hash,
            retries: rule.as_ref().and_then(|r| r.rule.retries.clone()),
            timeout: rule.as_ref().and_then(|r| r.rule.timeout),
            response_headers: [
                rule.as_ref().map(|r| r.rule.headers.response.clone()),
                Some(target.headers.response.clone()),
                cors_headers,
            ],
        };
        self.forward(req, plan, done).await
    }

    /// A response the agent makes itself (no upstream answered), recorded like any other.
    fn local_reply(&self, done: Done, reply: Reply) -> Response<ProxyBody> {
        let c = &self.conn;
        if reply.status.is_server_error() {
            c.stats.outbound_errors.fetch_add(1, Ordering::Relaxed);
        }
        own_reply(
            &c.inputs,
            c.protocol == AppProtocol::Grpc,
            c.dst,
            done,
            reply,
        )
    }
}

/// Builds the response for an answer the agent gives itself, recorded (metrics, access log)
/// when its body ends; `upstream` is what the access log names when no endpoint was tried.
pub(crate) fn own_reply(
    inputs: &ProxyInputs,
    grpc: bool,
    upstream: SocketAddrV4,
    done: Done,
    reply: Reply,
) -> Response<ProxyBody> {
    let (ep, reason) = reply.upstream.clone().unzip();
    let on_end = done.on_end(
        inputs,
        HttpOutcome {
            flag: reply.flag,
            grpc,
            response_code: reply.status.as_u16(),
            grpc_status: reply.grpc_status,
        },
        Default::default(),
        ep.unwrap_or(upstream),
        Some(reason.or(reply.failure.clone())),
    );
    let mut resp = Response::new(body::response(Full::new(reply.body), on_end));
    *resp.status_mut() = reply.status;
    let headers = resp.headers_mut();
    if let Some(ct) = reply.content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    if let Some(location) = reply.location {
        headers.insert(header::LOCATION, location);
    }
    if let Some(g) = reply.grpc_status {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(g));
    }
    rules::apply(&reply.headers, headers);
    resp
}

/// Builds the response for an upstream's answer: hop-by-hop headers gone (an upgrade's
/// kept), `header_ops` applied, in the client's HTTP version, recorded when its body ends.
#[expect(
    clippy::too_many_arguments,
    reason = "one response's parts, passed once from each side"
)]
pub(crate) fn upstream_reply(
    inputs: &ProxyInputs,
    resp: Response<h2_upstream::UpResp>,
    version: Version,
    grpc: bool,
    done: Done,
    request_bytes: Arc<std::sync::atomic::AtomicU64>,
    endpoint: SocketAddrV4,
    header_ops: &[Option<crate::config::routing::HeaderOps>],
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    let kept = switching.then(|| upgrade_headers(&parts.headers)).flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some((connection, proto)) = kept {
        parts.headers.insert(header::CONNECTION, connection);
        parts.headers.insert(header::UPGRADE, proto);
    }
    for ops in header_ops.iter().flatten() {
        rules::apply(ops, &mut parts.headers);
    }
    parts.version = version;
    let deadline = done.deadline;
    let on_end = done.on_end(
        inputs,
        HttpOutcome {
            flag: ResponseFlags::None,
            grpc,
            response_code: parts.status.as_u16(),
            grpc_status: grpc_status(&parts.headers),
        },
        request_bytes,
        endpoint,
        None,
    );
    Response::from_parts(parts, body::response_until(body, on_end, deadline))
}

/// After a 101, joins the client's upgraded connection to the upstream's, byte for byte.
pub(crate) fn join_upgrade(
    client: hyper::upgrade::OnUpgrade,
    resp: &mut Response<h2_upstream::UpResp>,
    pod: Arc<ObjectRef>,
    endpoint: SocketAddrV4,
    buffer_size: usize,
) {
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let progress = super::connections::Progress::default();
                super::relay::relay(&mut down, &mut up, buffer_size, &progress).await;
            }
            Err(e) => debug!(%pod, upstream = %endpoint, error = %e, "upgrade failed"),
        }
    });
}

/// Envoy's work on every request it proxies: an `x-request-id` if it has none, and, with
/// tracing on, this hop's span as the parent the next hop sees. The span is returned only
/// when sampled.
pub(crate) fn trace_hop<B>(
    routes: &super::RouteTable,
    req: &mut Request<B>,
    port: u16,
    peer: SocketAddrV4,
    upstream: SocketAddrV4,
) -> Option<Box<trace::Started>> {
    trace::context::ensure_request_id(req.headers_mut());
    let config = routes.tracing()?;
    let span = trace::context::begin(req.headers(), config.sampling);
    trace::context::inject(req.headers_mut(), &span);
    span.sampled
        .then(|| trace::Started::new(span, req, port, peer, upstream))
}

/// An answer the agent gives itself.
pub(crate) struct Reply {
    status: StatusCode,
    flag: ResponseFlags,
    body: Bytes,
    content_type: Option<&'static str>,
    location: Option<HeaderValue>,
    grpc_status: Option<u16>,
    headers: crate::config::routing::HeaderOps,
    /// The upstream tried and why it failed, for the access log.
    upstream: Option<(SocketAddrV4, String)>,
    failure: Option<String>,
}

impl Reply {
    fn new(status: StatusCode, flag: ResponseFlags, text: &'static str) -> Reply {
        Reply {
            status,
            flag,
            body: Bytes::from_static(text.as_bytes()),
            content_type: (!text.is_empty()).then_some("text/plain"),
            location: None,
            grpc_status: None,
            headers: Default::default(),
            upstream: None,
            failure: None,
        }
    }

    fn unavailable(flag: ResponseFlags, text: &'static str) -> Reply {
        Reply::new(StatusCode::SERVICE_UNAVAILABLE, flag, text)
    }
}

/// What a request's record needs, whoever answers it.
pub(crate) struct Done {
    labels: TcpLabels,
    started: Instant,
    log: Option<super::LogEntry>,
    info: Option<HttpInfo>,
    /// This hop's span, when the request is sampled.
    trace: Option<Box<trace::Started>>,
    /// The connection's `/connections` entry, for its byte counts.
    listed: Arc<super::connections::ConnInfo>,
    /// The route's `timeout`: the whole response, last byte included, must arrive by then.
    deadline: Option<Instant>,
}

/// How a request was answered, for its record.
pub(crate) struct HttpOutcome {
    /// The agent's own flag (`None` keeps the one set on the way, if any).
    flag: ResponseFlags,
    grpc: bool,
    response_code: u16,
    grpc_status: Option<u16>,
}

impl Done {
    /// What records the request when its response body ends: metrics, the access log entry
    /// (naming `upstream`, and `failure` when given), the span and the connection's bytes.
    fn on_end(
        self,
        inputs: &ProxyInputs,
        outcome: HttpOutcome,
        request_bytes: Arc<std::sync::atomic::AtomicU64>,
        upstream: SocketAddrV4,
        failure: Option<Option<String>>,
    ) -> body::OnEnd {
        let Done {
            mut labels,
            started,
            log,
            info,
            trace,
            listed,
            deadline: _,
        } = self;
        if outcome.flag != ResponseFlags::None {
            labels.flags = outcome.flag;
        }
        body::OnEnd {
            listed,
            trace: trace.map(|t| (t, inputs.spans.clone())),
            metrics: inputs.metrics.clone(),
            access_log: inputs.access_log.clone(),
            labels: HttpLabels {
                conn: labels,
                grpc: outcome.grpc,
                response_code: outcome.response_code,
                grpc_status: outcome.grpc_status,
            },
            started,
            request_bytes,
            log: log.map(|l| {
                let mut info = info;
                if let (Some(i), Some(f)) = (info.as_mut(), failure) {
                    i.failure = f;
                }
                (l, info, upstream)
            }),
        }
    }
}

/// The request as the app should get it: hop-by-hop headers gone, `Host` kept, and the
/// request target in the form the upstream protocol wants.
fn prepare_request<B>(req: &mut Request<B>, h2: bool) {
    strip_hop_by_hop(req.headers_mut());
    // The URI is rebuilt from its own parsed parts (shared bytes), not printed and parsed.
    let uri = std::mem::take(req.uri_mut());
    let authority = uri.authority().cloned().or_else(|| {
        let host = req.headers().get(header::HOST)?;
        hyper::http::uri::Authority::try_from(host.as_bytes()).ok()
    });
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    if h2 {
        // HTTP/2 carries the authority and scheme as pseudo-headers, taken from the URI.
        parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
        parts.authority = authority;
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or(uri);
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
    } else {
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or(uri);
        if let Some(a) = authority
            && !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

/// RFC 9110 §7.6.1: headers for one hop only, plus those the `Connection` header names.
/// `TE: trailers` is kept (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a hashed removal each.
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in hop_by_hop_names() {
        headers.remove(n);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// The headers that are always for one hop only (RFC 9110 §7.6.1, plus the legacy
/// `Keep-Alive` and `Proxy-Connection`).
fn hop_by_hop_names() -> [HeaderName; 7] {
    // Evaluated at compile time: the custom names are not validated on every call.
    const NAMES: [HeaderName; 7] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ];
    NAMES
}

/// Whether [`strip_hop_by_hop`] has something to look at for `name`: one of those, or `TE`
/// (gone unless `trailers`). Headers the `Connection` header names come with it.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || hop_by_hop_names().contains(name)
}

/// `Connection: upgrade` with an `Upgrade` protocol: both, to send on.
fn upgrade_headers(headers: &HeaderMap) -> Option<(HeaderValue, HeaderValue)> {
    let proto = headers.get(header::UPGRADE)?.clone();
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| (HeaderValue::from_static("upgrade"), proto))
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `opens_with_h2_preface` says of a client that writes `parts` (pausing between
    /// them) and then closes, over a real loopback connection.
    async fn preface_of(parts: &'static [&'static [u8]]) -> bool {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            for p in parts {
                c.write_all(p).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let (server, _) = listener.accept().await.expect("accept");
        let h2 = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            opens_with_h2_preface(&server),
        )
        .await
        .expect("decided within 5 s")
        .expect("peek");
        writer.await.expect("writer");
        // Peeking consumed nothing: hyper reads the client's bytes from the start.
        let mut buf = [0u8; 3];
        let n = server.peek(&mut buf).await.expect("peek again");
        assert!(n == 0 || buf[..n] == parts[0][..n], "bytes were consumed");
        h2
    }

    #[tokio::test]
    async fn the_h2_preface_is_recognised_by_peeking_even_when_split() {
        assert!(preface_of(&[H2_PREFACE]).await);
        assert!(preface_of(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!preface_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]).await);
        // A prefix of the preface, then something else: HTTP/1 decides (and refuses it).
        assert!(!preface_of(&[b"PRI", b" / HTTP/1.1\r\n\r\n"]).await);
        // Closed before a byte: HTTP/1 sees the EOF.
        assert!(!preface_of(&[b""]).await);
    }

    #[test]
    fn h1_requests_keep_host_and_lose_hop_by_hop_headers() {
        let mut req = Request::builder()
            .uri("/reviews/1?x=1")
            .header("host", "reviews:9080")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("user-agent", "curl")
            .body(())
            .unwrap();
        prepare_request(&mut req, false);
        assert_eq!(req.uri(), "/reviews/1?x=1");
        assert_eq!(req.headers()["host"], "reviews:9080");
        for h in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(!req.headers().contains_key(h), "{h}");
        }
        assert_eq!(req.headers()["user-agent"], "curl");
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header_too() {
        for h in [
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
        ] {
            let mut req = Request::builder()
                .uri("/")
                .header("host", "reviews")
                .header(h, "x")
                .header("x-kept", "1")
                .body(())
                .unwrap();
            prepare_request(&mut req, false);
            assert!(!req.headers().contains_key(h), "{h}");
            assert_eq!(req.headers().len(), 2, "{h}: {:?}", req.headers());
        }
        // Nothing hop-by-hop: everything stays, `TE: trailers` included.
        let mut req = Request::builder()
            .uri("/a?b=c")
            .header("host", "reviews")
            .header("te", "trailers")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        prepare_request(&mut req, false);
        assert_eq!(req.headers().len(), 3);
        assert_eq!(req.uri(), "/a?b=c");
        // No authority anywhere: an h2 upstream gets the request's own target.
        let mut req = Request::builder().uri("/a").body(()).unwrap();
        prepare_request(&mut req, true);
        assert_eq!(req.uri(), "/a");
    }

    #[test]
    fn h2_clients_get_a_host_header_and_h2_upstreams_an_authority() {
        // An h2 client's request: the authority is in the URI, no Host header.
        let mut req = Request::builder()
            .uri("http://ratings:9080/ratings/0")
            .version(Version::HTTP_2)
            .header("te", "trailers")
            .body(())
            .unwrap();
        prepare_request(&mut req, false);
        assert_eq!(req.uri(), "/ratings/0");
        assert_eq!(req.headers()["host"], "ratings:9080");
        assert_eq!(req.version(), Version::HTTP_11);
        // An h1 client towards an h2 upstream.
        let mut req = Request::builder()
            .uri("/pkg.Svc/Call")
            .header("host", "grpc-svc:50051")
            .header("te", "trailers")
            .body(())
            .unwrap();
        prepare_request(&mut req, true);
        assert_eq!(req.uri(), "http://grpc-svc:50051/pkg.Svc/Call");
        assert!(!req.headers().contains_key("host"));
        assert_eq!(req.headers()["te"], "trailers");
    }
}
