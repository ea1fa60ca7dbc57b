//! An OTLP/gRPC trace receiver for the tracing tests: the OpenTelemetry project's generated
//! `TraceService` server, printing each span it receives as one JSON line
//! (`{"trace_id", "span_id", "parent_span_id", "name", "kind", "service", "attributes"}`,
//! ids in lower-case hex) on stdout.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use serde_json::{Map, Value, json};

use crate::announce;

#[derive(clap::Args)]
pub struct ReceiverArgs {
    #[arg(long, value_parser = crate::parse_listen)]
    listen: SocketAddr,
}

struct Printer;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> Value {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        other => json!(format!("{other:?}")),
    }
}

fn attributes(kvs: &[KeyValue]) -> Map<String, Value> {
    kvs.iter().map(|kv| (kv.key.clone(), text(kv))).collect()
}

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = std::io::stdout().lock();
        for rs in &request.get_ref().resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    let line = json!({
                        "trace_id": hex(&s.trace_id),
                        "span_id": hex(&s.span_id),
                        "parent_span_id": hex(&s.parent_span_id),
                        "name": s.name,
                        "kind": s.kind,
                        "service": resource.get("service.name"),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": attributes(&s.attributes),
                    });
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        let _ = out.flush();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn serve(args: ReceiverArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    announce(listener.local_addr().context("local address")?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Printer))
        .serve_with_incoming(incoming)
        .await
        .context("serving OTLP")
}
