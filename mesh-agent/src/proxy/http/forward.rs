//! Sending a routed request upstream: the connection pool's limit, tries with their
//! timeouts, retries on another endpoint, outlier detection's bookkeeping, then the response
//! (or an upgraded connection) passed back.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tracing::debug;

use super::body::{self, Counted, ProxyBody};
use super::h2_upstream::UpResp;
use super::replay::{self, Recording, Tee};
use super::upstream::{PoolSettings, Sender, UpBody};
use super::{CONNECT_FAILURE, Ctx, Done, RESET, Reply};
use crate::config::routing::{HeaderOps, Retries};
use crate::proxy::RouteTable;
use crate::proxy::protocol::AppProtocol;
use crate::proxy::routing::{Backend, EndpointState};
use crate::telemetry::metrics::ResponseFlags;

const TIMEOUT: &str = "upstream request timeout";
const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
/// Envoy's retry back-off: 25 ms base, doubling, jittered, at most 10 times the base.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Where and how a routed request goes.
pub struct Plan {
    pub routes: Arc<RouteTable>,
    pub backend: Arc<Backend>,
    pub hash: Option<u64>,
    /// The rule's retry policy; `None`: Istio's default.
    pub retries: Option<Retries>,
    pub timeout: Option<Duration>,
    pub response_headers: [Option<HeaderOps>; 3],
}

/// A request slot in the backend's connection pool, given back on drop.
struct InFlight<'a>(&'a Backend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint's active request, for LEAST_REQUEST.
struct Active(Arc<EndpointState>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request head kept to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

/// How one try ended.
enum Tried {
    Response(Response<UpResp>, Sender),
    /// No upstream connection (`UF`); the request comes back unsent, body and all.
    Connect(String, Option<Box<Request<UpBody>>>),
    /// The upstream connection failed before the response (`UC`).
    Reset(String),
    /// The try's timeout passed (`UT`).
    Timeout,
}

impl Ctx {
    /// Sends a copy of a bodiless request to `target`, with `-shadow` appended to its
    /// authority (Envoy's convention); the answer is read and dropped, failures only logged.
    pub(super) fn mirror(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        target: &Arc<crate::proxy::routing::RouteTarget>,
        routes: &Arc<RouteTable>,
    ) {
        let Ok(backend) = &target.backend else { return };
        if !hyper::body::Body::is_end_stream(req.body()) {
            return; // the body streams to the real destination only
        }
        let Some(picked) = backend.pick(None, &[]) else {
            return;
        };
        let endpoint = picked.endpoint.addr;
        let h2 = match backend.protocol {
            AppProtocol::Detect => self.conn.protocol == AppProtocol::Http2,
            p => p.upstream_h2(),
        };
        let mut copy = Request::new(Counted::new(Either::Right(Full::default())));
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        let authority = crate::telemetry::access_log::request_authority(req).unwrap_or_default();
        let shadow = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{host}-shadow:{port}")
            }
            _ => format!("{authority}-shadow"),
        };
        if let Ok(v) = hyper::header::HeaderValue::from_str(&shadow) {
            copy.headers_mut().insert(header::HOST, v);
            if copy.uri().authority().is_some()
                && let Ok(uri) = Uri::builder()
                    .scheme("http")
                    .authority(shadow.as_str())
                    .path_and_query(copy.uri().path_and_query().map_or("/", |p| p.as_str()))
                    .build()
            {
                *copy.uri_mut() = uri;
            }
        }
        super::prepare_request(&mut copy, h2);
        let identity = self
            .conn
            .hbone
            .as_ref()
            .and_then(|_| routes.identity(endpoint.ip()).cloned());
        // Only to a destination agent that parses HTTP on that port (see `try_once`).
        let shareable = routes.endpoint_protocol(&endpoint).is_http();
        let settings = PoolSettings::of(&backend.policy.connection_pool);
        let ctx = self.clone();
        let deadline = self.conn.inputs.connect_timeout * 2;
        tokio::spawn(async move {
            let c = &ctx.conn;
            let sent = tokio::time::timeout(deadline, async {
                let mut sender = ctx
                    .upstreams
                    .get(&c.pod, endpoint, identity.as_ref(), h2, shareable, settings)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut copy = copy;
                if sender.h2() != h2 {
                    super::prepare_request(&mut copy, sender.h2());
                }
                let resp = sender.send(copy).await.map_err(|e| e.to_string())?;
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(pod = %c.pod, upstream = %endpoint, error = %e, "mirrored request failed")
                }
                Err(_) => debug!(pod = %c.pod, upstream = %endpoint, "mirrored request timed out"),
            }
        });
    }

    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        plan: Plan,
        done: Done,
    ) -> Response<ProxyBody> {
        let c = &self.conn;
        let backend = &plan.backend;
        let _slot = match backend.max_in_flight() {
            Some(max) if backend.state.in_flight.fetch_add(1, Ordering::Relaxed) >= max => {
                backend.state.in_flight.fetch_sub(1, Ordering::Relaxed);
                backend.state.overflows.fetch_add(1, Ordering::Relaxed);
                return self.local_reply(
                    done,
                    Reply::unavailable(ResponseFlags::UpstreamOverflow, OVERFLOW),
                );
            }
            Some(_) => Some(InFlight(backend)),
            None => None,
        };
        // An undeclared port speaks to the app as its client spoke to us.
        let h2 = match backend.protocol {
            AppProtocol::Detect => c.protocol == AppProtocol::Http2,
            p => p.upstream_h2(),
        };
        let version = req.version();
        // WebSocket and other HTTP/1.1 upgrades pass through: the request keeps its Upgrade
        // headers, and after a 101 the two connections are joined byte for byte.
        let upgrade = (version == Version::HTTP_11 && !h2)
            .then(|| super::upgrade_headers(req.headers()))
            .flatten();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        // Upgrades need a connection of their own; everything else may share one.
        let shareable = client_upgrade.is_none();
        super::prepare_request(&mut req, h2);
        if let Some((connection, proto)) = upgrade {
            req.headers_mut().insert(header::CONNECTION, connection);
            req.headers_mut().insert(header::UPGRADE, proto);
        }
        // A body streams to the first try while a copy is kept (`replay`); a retry sends the
        // copy, or the request itself if it was never sent (no connection).
        let retries = plan.retries.clone().unwrap_or_else(Retries::istio_default);
        let bodiless = hyper::body::Body::is_end_stream(req.body());
        let attempts = if client_upgrade.is_none() {
            retries.attempts
        } else {
            0
        };
        let recording = (!bodiless && attempts > 0)
            .then(|| Arc::new(std::sync::Mutex::new(Recording::default())));
        let (parts, body) = req.into_parts();
        let head = Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        };
        let request_bytes = Counted::new(Either::Left(Tee::new(body, recording.clone())));
        let request_counter = request_bytes.counter();
        let mut first = Some(Request::from_parts(parts, request_bytes));

        let deadline = plan.timeout.map(|t| Instant::now() + t);
        let mut tried: Vec<SocketAddrV4> = Vec::new();
        let mut done = done;
        let outcome = loop {
            let Some(picked) = backend.pick(
                plan.hash,
                if retries.ignore_previous_hosts {
                    &[]
                } else {
                    &tried
                },
            ) else {
                break Err(Reply::unavailable(
                    ResponseFlags::NoHealthyUpstream,
                    super::NO_HEALTHY_UPSTREAM,
                ));
            };
            let endpoint = picked.endpoint.addr;
            picked.state.active.fetch_add(1, Ordering::Relaxed);
            let active = Active(picked.state.clone());
            tried.push(endpoint);
            let upstream_req = first.take().unwrap_or_else(|| {
                let copy = recording.as_ref().and_then(|r| replay::lock(r).replay());
                let mut r = Request::new(Counted::new(Either::Right(Full::new(
                    copy.unwrap_or_default(),
                ))));
                *r.method_mut() = head.method.clone();
                *r.uri_mut() = head.uri.clone();
                *r.version_mut() = head.version;
                *r.headers_mut() = head.headers.clone();
                r
            });
            let per_try = [
                retries.per_try_timeout.map(|t| Instant::now() + t),
                deadline,
            ]
            .into_iter()
            .flatten()
            .min();
            let result = self
                .try_once(
                    &plan,
                    endpoint,
                    upstream_req,
                    h2,
                    shareable,
                    per_try,
                    &mut done,
                )
                .await;
            let left = tried.len() <= attempts as usize;
            let status = match &result {
                Tried::Response(r, _) => Some(r.status().as_u16()),
                _ => None,
            };
            backend.observe(&active.0, status);
            let overall_expired = deadline.is_some_and(|d| Instant::now() >= d);
            let wanted = retriable(&result, &retries);
            // Something to send again: no body, the unsent request, or the whole body kept.
            let resendable = bodiless
                || matches!(result, Tried::Connect(_, Some(_)))
                || recording
                    .as_ref()
                    .is_some_and(|r| replay::lock(r).replay().is_some());
            let retry = left && !overall_expired && wanted && resendable;
            match result {
                // The client's body broke the upstream request: the client's fault, not the
                // upstream's (Envoy's 400 `DPE`).
                Tried::Reset(_) | Tried::Response(..) if body::failed(&request_counter) => {
                    let mut reply = Reply::new(
                        StatusCode::BAD_REQUEST,
                        ResponseFlags::DownstreamProtocolError,
                        "Bad Request",
                    );
                    reply.failure = Some("invalid request body".into());
                    break Err(reply);
                }
                Tried::Response(resp, sender) if !retry => {
                    if wanted && tried.len() > 1 {
                        done.labels.flags = ResponseFlags::UpstreamRetryLimitExceeded;
                    }
                    break Ok((resp, sender, endpoint, active));
                }
                Tried::Connect(e, _) if !retry => {
                    c.inputs
                        .stats
                        .connect_errors
                        .fetch_add(1, Ordering::Relaxed);
                    let mut reply =
                        Reply::unavailable(ResponseFlags::UpstreamConnectFailure, CONNECT_FAILURE);
                    reply.upstream = Some((endpoint, e));
                    break Err(reply);
                }
                Tried::Reset(e) if !retry => {
                    let mut reply =
                        Reply::unavailable(ResponseFlags::UpstreamConnectionTermination, RESET);
                    reply.upstream = Some((endpoint, e));
                    break Err(reply);
                }
                Tried::Timeout if !retry => {
                    let mut reply = Reply::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        ResponseFlags::UpstreamRequestTimeout,
                        TIMEOUT,
                    );
                    reply.upstream = Some((endpoint, TIMEOUT.to_owned()));
                    break Err(reply);
                }
                Tried::Response(resp, sender) => {
                    // Read nothing more from a response we drop; the connection is not kept.
                    drop((resp, sender));
                }
                Tried::Connect(_, unsent) => first = unsent.map(|r| *r),
                _ => {}
            }
            let n = (tried.len() - 1).min(4) as u32;
            let backoff = BACKOFF_BASE * 2u32.pow(n);
            let backoff = backoff.min(BACKOFF_BASE * 10).mul_f64(fastrand::f64());
            debug!(pod = %c.pod, upstream = %endpoint, try_number = tried.len(), "retrying request");
            tokio::time::sleep(backoff).await;
        };
        let (mut resp, sender, endpoint, active) = match outcome {
            Ok(r) => r,
            Err(reply) => return self.local_reply(done, reply),
        };
        if let Some(client_upgrade) = client_upgrade
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            // The upstream connection now belongs to the upgraded stream: not kept.
            drop(sender);
            super::join_upgrade(
                client_upgrade,
                &mut resp,
                c.pod.clone(),
                endpoint,
                c.inputs.buffer_size,
            );
        } else {
            let max = backend.policy.connection_pool.max_requests_per_connection;
            self.upstreams.put_back(endpoint, sender, max);
        }
        drop(active);
        // The route's timeout covers the response to its last byte, as Envoy's does.
        done.deadline = deadline;
        let grpc = c.protocol == AppProtocol::Grpc || backend.protocol == AppProtocol::Grpc;
        super::upstream_reply(
            &c.inputs,
            resp,
            version,
            grpc,
            done,
            request_counter,
            endpoint,
            &plan.response_headers,
        )
    }

    /// One try against one endpoint, bounded by `until`. `req` is in the form `h2` says;
    /// on a shared connection it goes as HTTP/2 whatever the app speaks.
    #[expect(
        clippy::too_many_arguments,
        reason = "one try's parts, passed once from the retry loop"
    )]
    async fn try_once(
        &self,
        plan: &Plan,
        endpoint: SocketAddrV4,
        mut req: Request<UpBody>,
        h2: bool,
        shareable: bool,
        until: Option<Instant>,
        done: &mut Done,
    ) -> Tried {
        let c = &self.conn;
        // The destination agent turns the shared connection's HTTP/2 back into what the app
        // speaks only where it parses HTTP: ports its Services declare HTTP.
        let shareable = shareable && plan.routes.endpoint_protocol(&endpoint).is_http();
        done.labels.destination = plan.routes.workload(endpoint.ip()).cloned();
        let identity = c
            .hbone
            .as_ref()
            .and_then(|_| plan.routes.identity(endpoint.ip()).cloned());
        done.labels.destination_principal.clone_from(&identity);
        let attempt = async {
            let settings = PoolSettings::of(&plan.backend.policy.connection_pool);
            let mut sender = match self
                .upstreams
                .get(&c.pod, endpoint, identity.as_ref(), h2, shareable, settings)
                .await
            {
                Ok(s) if s.h2() != h2 => {
                    super::prepare_request(&mut req, s.h2());
                    s
                }
                Ok(s) => s,
                Err(e) => {
                    debug!(pod = %c.pod, upstream = %endpoint, error = %e, "HTTP upstream connect failed");
                    return Tried::Connect(e.to_string(), Some(Box::new(req)));
                }
            };
            match sender.send(req).await {
                Ok(resp) => Tried::Response(resp, sender),
                Err(e) => {
                    debug!(pod = %c.pod, upstream = %endpoint, error = %e, "HTTP upstream reset before the response");
                    Tried::Reset(e.to_string())
                }
            }
        };
        match until {
            None => attempt.await,
            Some(t) => match tokio::time::timeout_at(t.into(), attempt).await {
                Ok(r) => r,
                Err(_) => Tried::Timeout,
            },
        }
    }
}

/// Whether a try's outcome is one the retry policy retries.
fn retriable(t: &Tried, r: &Retries) -> bool {
    let on = &r.retry_on;
    match t {
        Tried::Connect(..) => on.connect_failure || on.reset || on.gateway_error || on.server_error,
        Tried::Reset(_) => on.reset || on.server_error || on.refused_stream,
        // Envoy retries a try that timed out when the policy has a per-try timeout.
        Tried::Timeout => r.per_try_timeout.is_some(),
        Tried::Response(resp, _) => retriable_status(resp.status().as_u16(), resp.headers(), r),
    }
}

fn retriable_status(status: u16, headers: &HeaderMap, r: &Retries) -> bool {
    let on = &r.retry_on;
    (on.server_error && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (on.retriable_4xx && status == 409)
        || on.status_codes.contains(&status)
        || super::grpc_status(headers).is_some_and(|g| on.grpc_statuses.contains(&g))
}
