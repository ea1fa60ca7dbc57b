//! HTTP at the source agent: a captured connection to a Service port that declares HTTP
//! (`appProtocol`, or a port name `http*`, `http2*`, `grpc*`) is served as HTTP/1.1 or
//! h2c (prior knowledge), and each request is balanced on its own over the Service's
//! endpoints, then sent over HBONE (or TCP to pods outside the mesh) in HTTP/1.1, or HTTP/2
//! for `http2`/`grpc` ports.
//!
//! Upstream connections belong to the client connection that opened them (one per endpoint
//! for HTTP/2, a few idle ones per endpoint for HTTP/1.1), so keep-alive clients reuse them and
//! no lock is shared with other connections. Errors are answered as Envoy answers them, with
//! the response flag kept for metrics and the access log: no endpoint 503 `UH`, connect
//! failure 503 `UF`, upstream reset before the response 503 `UC`.

mod body;
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

use self::body::{Counted, ProxyBody};
use self::upstream::Upstreams;
use super::outbound::Hbone;
use super::protocol::AppProtocol;
use super::{ProxyInputs, Target, WorkloadStats};
use crate::capture::netns::SocketSource;
use crate::config::model::ObjectRef;
use crate::telemetry::access_log::{HttpInfo, request_authority};
use crate::telemetry::metrics::{HttpLabels, ResponseFlags, TcpLabels};

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
}

/// Serves the connection until the client closes it.
pub async fn serve(conn: HttpConn, client: TcpStream) {
    let pod = conn.pod.clone();
    let peer = conn.client;
    let ctx = Arc::new(Ctx {
        upstreams: Upstreams::new(
            conn.sockets.clone(),
            conn.hbone.clone(),
            conn.inputs.connect_timeout,
            conn.protocol.upstream_h2(),
        ),
        conn,
    });
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.request(req).await) }
    });
    let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(client), service)
        .await;
    if let Err(e) = served {
        debug!(%pod, client = %peer, error = %e, "HTTP connection ended with an error");
    }
}

struct Ctx {
    conn: HttpConn,
    upstreams: Upstreams,
}

/// Envoy's bodies for its own error responses.
const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

impl Ctx {
    async fn request(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let c = &self.conn;
        let routes = c.inputs.routes.load();
        let mut labels = TcpLabels::source();
        labels.source = routes.workload(&c.src).cloned();
        if let Some(h) = &c.hbone {
            labels.source_principal = Some(h.identity.clone());
        }
        let log = super::LogEntry::begin(&routes, c.client, c.dst);
        let info = log.as_ref().map(|_| HttpInfo::of_request(&req));
        let picked = match routes.target(c.dst) {
            Target::Service(route) => {
                labels.service = Some(route.meta.clone());
                route.pick().map(|ep| ep.addr)
            }
            // The Service went away while the client kept its connection.
            Target::Passthrough => None,
        };
        let Some(endpoint) = picked else {
            drop(routes);
            let done = Done {
                labels,
                started,
                log,
                info,
            };
            return self.local_reply(
                done,
                ResponseFlags::NoHealthyUpstream,
                NO_HEALTHY_UPSTREAM,
                None,
            );
        };
        labels.destination = routes.workload(endpoint.ip()).cloned();
        let identity = c
            .hbone
            .as_ref()
            .and_then(|_| routes.identity(endpoint.ip()).cloned());
        labels.destination_principal.clone_from(&identity);
        drop(routes);

        let mut sender = match self
            .upstreams
            .get(&c.pod, endpoint, identity.as_ref())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                c.inputs
                    .stats
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                debug!(pod = %c.pod, upstream = %endpoint, error = %e, "HTTP upstream connect failed");
                let done = Done {
                    labels,
                    started,
                    log,
                    info,
                };
                return self.local_reply(
                    done,
                    ResponseFlags::UpstreamConnectFailure,
                    CONNECT_FAILURE,
                    Some((endpoint, e.to_string())),
                );
            }
        };
        let version = req.version();
        // WebSocket and other HTTP/1.1 upgrades pass through: the request keeps its
        // Upgrade headers, and after a 101 the two connections are joined byte for byte.
        let upgrade = (version == Version::HTTP_11 && !sender.h2())
            .then(|| upgrade_headers(req.headers()))
            .flatten();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        prepare_request(&mut req, sender.h2());
        if let Some((connection, proto)) = upgrade {
            req.headers_mut().insert(header::CONNECTION, connection);
            req.headers_mut().insert(header::UPGRADE, proto);
        }
        let (parts, body) = req.into_parts();
        let request_bytes = Counted::new(body);
        let request_counter = request_bytes.counter();
        let upstream_req = Request::from_parts(parts, request_bytes);
        let resp = match sender.send(upstream_req).await {
            Ok(r) => r,
            Err(e) => {
                debug!(pod = %c.pod, upstream = %endpoint, error = %e, "HTTP upstream reset before the response");
                let done = Done {
                    labels,
                    started,
                    log,
                    info,
                };
                return self.local_reply(
                    done,
                    ResponseFlags::UpstreamConnectionTermination,
                    RESET,
                    Some((endpoint, e.to_string())),
                );
            }
        };
        let mut resp = resp;
        if let Some(client_upgrade) = client_upgrade
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            // The upstream connection now belongs to the upgraded stream: not kept.
            drop(sender);
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (pod, size) = (c.pod.clone(), c.inputs.buffer_size);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((down, up)) => {
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        let progress = super::connections::Progress::default();
                        super::relay::relay(&mut down, &mut up, size, &progress).await;
                    }
                    Err(e) => debug!(%pod, upstream = %endpoint, error = %e, "upgrade failed"),
                }
            });
        } else {
            self.upstreams.put_back(endpoint, sender);
        }
        let (mut parts, body) = resp.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let kept = switching.then(|| upgrade_headers(&parts.headers)).flatten();
        strip_hop_by_hop(&mut parts.headers);
        if let Some((connection, proto)) = kept {
            parts.headers.insert(header::CONNECTION, connection);
            parts.headers.insert(header::UPGRADE, proto);
        }
        parts.version = version;
        let grpc = c.protocol == AppProtocol::Grpc;
        let http = HttpLabels {
            conn: labels,
            grpc,
            response_code: parts.status.as_u16(),
            grpc_status: grpc_status(&parts.headers),
        };
        let on_end = body::OnEnd {
            metrics: c.inputs.metrics.clone(),
            access_log: c.inputs.access_log.clone(),
            labels: http,
            started,
            request_bytes: request_counter,
            log: log.map(|l| (l, info, endpoint)),
        };
        Response::from_parts(parts, body::response(body, on_end))
    }

    /// A response the agent makes itself (no upstream answered), recorded like any other.
    fn local_reply(
        &self,
        done: Done,
        flag: ResponseFlags,
        text: &'static str,
        upstream: Option<(SocketAddrV4, String)>,
    ) -> Response<ProxyBody> {
        let c = &self.conn;
        let Done {
            mut labels,
            started,
            log,
            info,
        } = done;
        labels.flags = flag;
        c.stats.outbound_errors.fetch_add(1, Ordering::Relaxed);
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let http = HttpLabels {
            conn: labels,
            grpc: c.protocol == AppProtocol::Grpc,
            response_code: status.as_u16(),
            grpc_status: None,
        };
        let on_end = body::OnEnd {
            metrics: c.inputs.metrics.clone(),
            access_log: c.inputs.access_log.clone(),
            labels: http,
            started,
            request_bytes: Default::default(),
            log: log.map(|l| {
                let (ep, reason) = upstream.clone().unzip();
                let mut info = info;
                if let Some(i) = info.as_mut() {
                    i.failure = reason;
                }
                (l, info, ep.unwrap_or(c.dst))
            }),
        };
        let mut resp = Response::new(body::response(
            Full::new(Bytes::from_static(text.as_bytes())),
            on_end,
        ));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }
}

/// What a request's record needs when the agent answers it itself.
struct Done {
    labels: TcpLabels,
    started: Instant,
    log: Option<super::LogEntry>,
    info: Option<HttpInfo>,
}

/// The request as the app should get it: hop-by-hop headers gone, `Host` kept, and the
/// request target in the form the upstream protocol wants.
fn prepare_request<B>(req: &mut Request<B>, h2: bool) {
    let authority = request_authority(req);
    strip_hop_by_hop(req.headers_mut());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if h2 {
        // HTTP/2 carries the authority and scheme as pseudo-headers, taken from the URI.
        let auth = authority.clone().unwrap_or_default();
        if let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(auth.as_str())
            .path_and_query(path.as_str())
            .build()
        {
            *req.uri_mut() = uri;
        }
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
    } else {
        if let Ok(uri) = path.parse() {
            *req.uri_mut() = uri;
        }
        if let Some(a) = authority
            && !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&a)
        {
            req.headers_mut().insert(header::HOST, v);
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

/// RFC 9110 §7.6.1: headers for one hop only, plus those the `Connection` header names.
/// `TE: trailers` is kept (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(n);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
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
