//! Distributed tracing, as Istio's proxies do it: each agent hop of an HTTP request is one
//! span (`CLIENT` at the source agent, `SERVER` at the destination's), named
//! `{service}:{port}/*`, with Istio's tags, parented through the request's headers
//! ([`context`]) and exported with OTLP ([`export`]).
//!
//! The data path decides sampling and rewrites headers; it never formats or sends a span. A
//! sampled request carries a [`Started`] span to its end, then hands a [`SpanRecord`] to a
//! bounded queue with `try_send`; the exporter on the control runtime batches and sends. A
//! full queue or a dead collector drops spans and counts them: tracing never slows traffic.

pub mod context;
pub mod export;

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::SystemTime;

use hyper::Request;
use serde::Serialize;

pub use self::context::SpanContext;
pub use self::export::{SpanStats, Spans};
use crate::telemetry::metrics::{HttpLabels, Reporter, WorkloadMeta};

/// Where spans go and how many, from MeshConfig: the `opentelemetry` extension provider named
/// in `defaultProviders.tracing`, and `defaultConfig.tracing.sampling`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TracingConfig {
    /// The extension provider's name.
    pub provider: String,
    /// The collector: a Service host (`name.namespace.svc.cluster.local`, `name.namespace`)
    /// or an IP address.
    pub service: String,
    /// Its OTLP/gRPC port.
    pub port: u16,
    /// Percent of new traces sampled (0 to 100). A caller's decision is kept.
    pub sampling: f64,
}

/// Istio's default sampling percentage.
pub const DEFAULT_SAMPLING: f64 = 1.0;

/// A sampled request's span, from its first byte to its last.
#[derive(Debug)]
pub struct Started {
    pub context: SpanContext,
    pub start: SystemTime,
    /// `{service}:{port}/*` needs the port the client asked for.
    pub port: u16,
    pub method: String,
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// The downstream peer.
    pub peer: SocketAddrV4,
    /// The upstream address the request went to.
    pub upstream: SocketAddrV4,
}

impl Started {
    /// A span for `req` (after its `x-request-id` and trace headers are set).
    pub fn new<B>(
        context: SpanContext,
        req: &Request<B>,
        port: u16,
        peer: SocketAddrV4,
        upstream: SocketAddrV4,
    ) -> Box<Started> {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let authority = crate::telemetry::access_log::request_authority(req).unwrap_or_default();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        Box::new(Started {
            context,
            start: SystemTime::now(),
            port,
            method: req.method().as_str().to_string(),
            url: format!("http://{authority}{path}"),
            protocol: crate::telemetry::access_log::protocol_name(req.version()),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            peer,
            upstream,
        })
    }

    /// The finished span, with what the request's labels say about it.
    pub fn finish(
        self,
        labels: &HttpLabels,
        request_bytes: u64,
        response_bytes: u64,
    ) -> SpanRecord {
        let conn = &labels.conn;
        let service = conn.service.as_ref().map(|s| s.fqdn.as_str());
        let name = format!("{}:{}/*", service.unwrap_or("unknown"), self.port);
        // The span describes the workload whose agent reports it.
        let (me, kind) = match conn.reporter {
            Reporter::Source => (conn.source.as_ref(), SpanKind::Client),
            Reporter::Destination => (conn.destination.as_ref(), SpanKind::Server),
        };
        let cluster = match (conn.reporter, service) {
            (Reporter::Destination, _) => format!("inbound|{}||", self.upstream.port()),
            (Reporter::Source, Some(s)) => format!("outbound|{}||{s}", self.port),
            (Reporter::Source, None) => "PassthroughCluster".into(),
        };
        let status = labels.response_code;
        let mut tags: Vec<(&'static str, String)> = vec![
            ("component", "proxy".into()),
            ("node_id", node_id(me)),
            ("http.url", self.url),
            ("http.method", self.method),
            ("http.protocol", self.protocol.into()),
            ("http.status_code", status.to_string()),
            ("response_flags", conn.flags.as_str().into()),
            ("upstream_cluster", cluster.clone()),
            ("upstream_cluster.name", cluster),
            ("peer.address", self.peer.ip().to_string()),
            ("request_size", request_bytes.to_string()),
            ("response_size", response_bytes.to_string()),
            ("istio.mesh_id", "cluster.local".into()),
        ];
        if let Some(m) = me {
            tags.push(("istio.canonical_service", m.canonical_service.clone()));
            tags.push(("istio.canonical_revision", m.canonical_revision.clone()));
            tags.push(("istio.namespace", m.namespace.clone()));
        }
        if let Some(ua) = self.user_agent {
            tags.push(("user_agent", ua));
        }
        if let Some(id) = self.request_id {
            tags.push(("guid:x-request-id", id));
        }
        if let Some(g) = labels.grpc_status {
            tags.push(("grpc.status_code", g.to_string()));
        }
        let error = status >= 500 || status == 0;
        if error {
            tags.push(("error", "true".into()));
        }
        SpanRecord {
            context: self.context,
            kind,
            name,
            start: self.start,
            end: SystemTime::now(),
            service_name: me.map_or_else(
                || "unknown".into(),
                |m| format!("{}.{}", m.canonical_service, m.namespace),
            ),
            tags,
            error,
        }
    }
}

fn node_id(me: Option<&Arc<WorkloadMeta>>) -> String {
    me.map_or_else(
        || "unknown".into(),
        |m| format!("{}.{}", m.name, m.namespace),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Client,
    Server,
}

/// A finished span, waiting for the exporter.
#[derive(Debug)]
pub struct SpanRecord {
    pub context: SpanContext,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The reporting workload, `{canonical service}.{namespace}` (Istio's service name).
    pub service_name: String,
    pub tags: Vec<(&'static str, String)>,
    pub error: bool,
}
