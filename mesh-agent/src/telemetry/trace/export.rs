//! Sending finished spans to the collector with OTLP over gRPC (the OpenTelemetry project's
//! generated `TraceService` client).
//!
//! The queue and batching are ours rather than the OpenTelemetry SDK's batch processor: the
//! data path must never wait, and every span the agent loses (queue full, collector down or
//! unknown) must be counted where operators look (`nodemesh_tracing_spans_dropped`), which the
//! SDK's processor only logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::{SpanKind, SpanRecord};
use crate::proxy::RouteTable;

/// Spans waiting for the exporter at most; beyond, new spans are dropped and counted.
const QUEUE: usize = 4096;
/// Spans sent in one export call at most.
const BATCH: usize = 512;
/// How long the exporter waits for more spans after the first of a batch.
const LINGER: Duration = Duration::from_millis(200);
/// One export call, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What happened to spans, for `/stats` and the agent's metrics.
#[derive(Debug, Default, Serialize)]
pub struct SpanStats {
    pub exported: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the export failed (collector down, refused, timed out).
    pub dropped_export_failed: AtomicU64,
    /// Dropped because the configured collector resolves to no address.
    pub dropped_no_collector: AtomicU64,
}

impl SpanStats {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_export_failed.load(Ordering::Relaxed)
            + self.dropped_no_collector.load(Ordering::Relaxed)
    }
}

/// The data path's handle: cloned only for sampled requests, never blocks.
#[derive(Clone, Debug)]
pub struct Spans {
    tx: mpsc::Sender<SpanRecord>,
    pub stats: Arc<SpanStats>,
}

impl Spans {
    /// The handle and the queue's receiving end, for [`run`].
    pub fn new() -> (Spans, mpsc::Receiver<SpanRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let spans = Spans {
            tx,
            stats: Arc::default(),
        };
        (spans, rx)
    }

    pub fn record(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Exports until every [`Spans`] handle is gone: batches of up to [`BATCH`], to the collector
/// the configuration in force names (resolved against the Services the agent knows).
pub async fn run(
    mut rx: mpsc::Receiver<SpanRecord>,
    routes: Arc<ArcSwap<RouteTable>>,
    stats: Arc<SpanStats>,
) {
    let mut client: Option<(SocketAddr, TraceServiceClient<Channel>)> = None;
    let mut failures = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len() as u64;
        let table = routes.load();
        let Some((config, addr)) = table
            .tracing()
            .and_then(|c| table.resolve(&c.service, c.port).map(|a| (c.clone(), a)))
        else {
            stats.dropped_no_collector.fetch_add(n, Ordering::Relaxed);
            failures += 1;
            if failures == 1 || failures.is_multiple_of(100) {
                let wanted = table.tracing().map(|c| format!("{}:{}", c.service, c.port));
                warn!(collector = ?wanted, spans = n, failures,
                    "dropping spans: the tracing collector resolves to no endpoint");
            }
            batch.clear();
            continue;
        };
        drop(table);
        let request = request(std::mem::take(&mut batch));
        batch = Vec::with_capacity(BATCH);
        let sender = match &mut client {
            Some((a, c)) if *a == SocketAddr::V4(addr) => c,
            _ => {
                let c = connect(addr.into());
                &mut client.insert((addr.into(), c)).1
            }
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, sender.export(request)).await {
            Ok(Ok(_)) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                if failures > 0 {
                    debug!(collector = %addr, "span export works again");
                }
                failures = 0;
            }
            outcome => {
                stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                failures += 1;
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                };
                if failures == 1 || failures.is_multiple_of(100) {
                    warn!(collector = %addr, provider = %config.provider, spans = n, failures,
                        %error, "dropping spans: export to the tracing collector failed");
                }
                // Start over with a new connection next time.
                client = None;
            }
        }
    }
}

fn connect(addr: SocketAddr) -> TraceServiceClient<Channel> {
    // The URI is built from a socket address: always valid.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|_| Endpoint::from_static("http://127.0.0.1:4317"))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    TraceServiceClient::new(endpoint.connect_lazy())
}

/// One export request: spans grouped by the workload that reported them (OTLP's resource,
/// whose `service.name` is what Jaeger and others show as the service).
pub fn request(spans: Vec<SpanRecord>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for s in spans {
        let (service, span) = to_proto(s);
        by_service.entry(service).or_default().push(span);
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "nodemesh".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn to_proto(s: SpanRecord) -> (String, Span) {
    let nanos = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let kind = match s.kind {
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Server => span::SpanKind::Server,
    };
    let span = Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.context.span_id.to_vec(),
        parent_span_id: s.context.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(s.context.sampled),
        name: s.name,
        kind: kind as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s.tags.into_iter().map(|(k, v)| kv(k, v)).collect(),
        status: Some(Status {
            code: if s.error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    (s.service_name, span)
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::SpanContext;

    fn record(service: &str, kind: SpanKind, parent: Option<[u8; 8]>) -> SpanRecord {
        SpanRecord {
            context: SpanContext {
                trace_id: [7; 16],
                span_id: [1; 8],
                parent_id: parent,
                sampled: true,
            },
            kind,
            name: "web.default.svc.cluster.local:80/*".into(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            service_name: service.into(),
            tags: vec![("http.status_code", "503".into())],
            error: true,
        }
    }

    #[test]
    fn spans_are_grouped_by_reporting_workload() {
        let req = request(vec![
            record("web.default", SpanKind::Server, Some([2; 8])),
            record("client.default", SpanKind::Client, None),
            record("web.default", SpanKind::Server, Some([3; 8])),
        ]);
        let services: Vec<(String, usize)> = req
            .resource_spans
            .iter()
            .map(|r| {
                let name = match &r.resource.as_ref().unwrap().attributes[0].value {
                    Some(AnyValue {
                        value: Some(any_value::Value::StringValue(s)),
                    }) => s.clone(),
                    other => panic!("{other:?}"),
                };
                (name, r.scope_spans[0].spans.len())
            })
            .collect();
        assert_eq!(
            services,
            [("client.default".into(), 1), ("web.default".into(), 2)]
        );
        let client = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(client.kind, span::SpanKind::Client as i32);
        assert!(client.parent_span_id.is_empty(), "a root span");
        assert_eq!(client.start_time_unix_nano, 1_000_000_000);
        assert_eq!(client.end_time_unix_nano, 2_000_000_000);
        assert_eq!(
            client.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        let server = &req.resource_spans[1].scope_spans[0].spans[0];
        assert_eq!(server.kind, span::SpanKind::Server as i32);
        assert_eq!(server.parent_span_id, vec![2; 8]);
        assert_eq!(server.trace_id, vec![7; 16]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (spans, _rx) = Spans::new();
        for _ in 0..QUEUE + 5 {
            spans.record(record("a.b", SpanKind::Client, None));
        }
        assert_eq!(spans.stats.dropped_queue_full.load(Ordering::Relaxed), 5);
        assert_eq!(spans.stats.dropped(), 5);
    }
}
