//! Istio-compatible metrics, so Istio's dashboards and Kiali read nodemesh unchanged.
//!
//! This slice reports TCP metrics (`istio_tcp_*`) for the connections the source agent
//! proxies (`reporter="source"`), `istio_build`, and the agent's own health. Label values
//! follow Istio: `unknown` when absent, canonical service and revision from the usual labels.
//!
//! The data path resolves a connection's label set once, when the upstream is chosen, and
//! keeps the counter handles; bytes are added when the connection closes.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::model::{Pod, Service};
use crate::identity::Identity;

/// Istio's default cluster id.
const CLUSTER: &str = "Kubernetes";
const UNKNOWN: &str = "unknown";

/// A workload's identity as metrics label it.
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct WorkloadMeta {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl WorkloadMeta {
    /// Istio's rules: canonical name from `service.istio.io/canonical-name`, then
    /// `app.kubernetes.io/name`, then `app`, else the workload name; revision from
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else
    /// `latest`.
    pub fn of(pod: &Pod) -> WorkloadMeta {
        let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k).cloned());
        WorkloadMeta {
            name: pod.id.name.clone(),
            namespace: pod.id.namespace.clone(),
            app: label(&["app"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version"]).unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| pod.id.name.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
        }
    }
}

/// A Service as metrics label it.
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct ServiceMeta {
    /// `name.namespace.svc.cluster.local`.
    pub fqdn: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceMeta {
    pub fn of(svc: &Service) -> ServiceMeta {
        ServiceMeta {
            fqdn: format!("{}.{}.svc.cluster.local", svc.id.name, svc.id.namespace),
            name: svc.id.name.clone(),
            namespace: svc.id.namespace.clone(),
        }
    }
}

/// Envoy's response flags this slice can produce.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    /// No flag (`-`).
    None,
    /// No healthy upstream (`UH`).
    NoHealthyUpstream,
    /// Upstream connection failure (`UF`).
    UpstreamConnectFailure,
    /// The upstream connection ended before the response (`UC`).
    UpstreamConnectionTermination,
    /// The client went away before the response was complete (`DC`).
    DownstreamConnectionTermination,
    /// A VirtualService governs the host and no rule matched (`NR`).
    NoRouteFound,
    /// The route names a host, port or subset that does not exist (`NC`).
    NoClusterFound,
    /// The route's timeout or a try's timeout passed (`UT`).
    UpstreamRequestTimeout,
    /// Retries ran out and the last try's answer was passed on (`URX`).
    UpstreamRetryLimitExceeded,
    /// The DestinationRule's connection pool was full (`UO`).
    UpstreamOverflow,
    /// A fault abort answered the request (`FI`).
    FaultInjected,
    /// A fault delay held the request (`DI`).
    DelayInjected,
    /// The client's request was not valid HTTP (invalid chunking, ...) (`DPE`).
    DownstreamProtocolError,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::UpstreamConnectFailure => "UF",
            ResponseFlags::UpstreamConnectionTermination => "UC",
            ResponseFlags::DownstreamConnectionTermination => "DC",
            ResponseFlags::NoRouteFound => "NR",
            ResponseFlags::NoClusterFound => "NC",
            ResponseFlags::UpstreamRequestTimeout => "UT",
            ResponseFlags::UpstreamRetryLimitExceeded => "URX",
            ResponseFlags::UpstreamOverflow => "UO",
            ResponseFlags::FaultInjected => "FI",
            ResponseFlags::DelayInjected => "DI",
            ResponseFlags::DownstreamProtocolError => "DPE",
        }
    }
}

/// Which end of a connection reports it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    /// The agent of the client pod.
    Source,
    /// The agent of the server pod.
    Destination,
}

/// The label set of one proxied TCP connection. Cheap to clone and hash: the strings live
/// in shared metadata built once per config snapshot.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Option<Arc<WorkloadMeta>>,
    pub destination: Option<Arc<WorkloadMeta>>,
    pub service: Option<Arc<ServiceMeta>>,
    pub flags: ResponseFlags,
    /// SPIFFE identities, when known (mutual TLS between agents).
    pub source_principal: Option<Arc<Identity>>,
    pub destination_principal: Option<Arc<Identity>>,
    /// The connection arrived over mutual TLS (only the destination can tell).
    pub mutual_tls: bool,
}

impl TcpLabels {
    /// A source-reported connection with nothing known yet.
    pub fn source() -> TcpLabels {
        TcpLabels {
            reporter: Reporter::Source,
            source: None,
            destination: None,
            service: None,
            flags: ResponseFlags::None,
            source_principal: None,
            destination_principal: None,
            mutual_tls: false,
        }
    }
}

impl TcpLabels {
    /// Istio's labels shared by TCP and HTTP metrics, with `request_protocol`.
    fn pairs(&self, protocol: &'static str) -> [(&'static str, String); 23] {
        let w = |m: &Option<Arc<WorkloadMeta>>, f: fn(&WorkloadMeta) -> &str| -> String {
            m.as_deref().map_or(UNKNOWN, f).to_string()
        };
        let s = |f: fn(&ServiceMeta) -> &str| -> String {
            self.service.as_deref().map_or(UNKNOWN, f).to_string()
        };
        let src = &self.source;
        let dst = &self.destination;
        let p =
            |id: &Option<Arc<Identity>>| id.as_deref().map_or(UNKNOWN.into(), |i| i.to_string());
        // The source agent cannot know the peer's security policy: Istio reports `unknown`.
        let policy = match (self.reporter, self.mutual_tls) {
            (Reporter::Source, _) => UNKNOWN,
            (Reporter::Destination, true) => "mutual_tls",
            (Reporter::Destination, false) => "none",
        };
        let reporter = match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        [
            ("reporter", reporter.into()),
            ("source_workload", w(src, |m| &m.name)),
            ("source_workload_namespace", w(src, |m| &m.namespace)),
            ("source_principal", p(&self.source_principal)),
            ("source_app", w(src, |m| &m.app)),
            ("source_version", w(src, |m| &m.version)),
            ("source_canonical_service", w(src, |m| &m.canonical_service)),
            (
                "source_canonical_revision",
                w(src, |m| &m.canonical_revision),
            ),
            ("source_cluster", CLUSTER.into()),
            ("destination_workload", w(dst, |m| &m.name)),
            ("destination_workload_namespace", w(dst, |m| &m.namespace)),
            ("destination_principal", p(&self.destination_principal)),
            ("destination_app", w(dst, |m| &m.app)),
            ("destination_version", w(dst, |m| &m.version)),
            ("destination_service", s(|m| &m.fqdn)),
            ("destination_service_name", s(|m| &m.name)),
            ("destination_service_namespace", s(|m| &m.namespace)),
            (
                "destination_canonical_service",
                w(dst, |m| &m.canonical_service),
            ),
            (
                "destination_canonical_revision",
                w(dst, |m| &m.canonical_revision),
            ),
            ("destination_cluster", CLUSTER.into()),
            ("request_protocol", protocol.into()),
            ("response_flags", self.flags.as_str().into()),
            ("connection_security_policy", policy.into()),
        ]
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        for (k, v) in self.pairs("tcp") {
            (k, v.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// One HTTP request's labels: the connection's, plus what the response said.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct HttpLabels {
    pub conn: TcpLabels,
    /// `grpc` instead of `http` for `request_protocol`.
    pub grpc: bool,
    pub response_code: u16,
    /// `grpc-status` of a gRPC response (trailers or headers), if any.
    pub grpc_status: Option<u16>,
}

impl EncodeLabelSet for HttpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        let protocol = if self.grpc { "grpc" } else { "http" };
        for (k, v) in self.conn.pairs(protocol) {
            (k, v.as_str()).encode(encoder.encode_label())?;
        }
        let code = self.response_code.to_string();
        ("response_code", code.as_str()).encode(encoder.encode_label())?;
        let grpc = self.grpc_status.map(|g| g.to_string());
        let grpc = grpc.as_deref().unwrap_or("");
        ("grpc_response_status", grpc).encode(encoder.encode_label())?;
        Ok(())
    }
}

/// Envoy's default histogram buckets, which Istio's request metrics use.
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn envoy_histogram() -> Histogram {
    Histogram::new(ENVOY_BUCKETS)
}

type HttpHistograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Counters of one connection, resolved once.
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

/// The data path's metrics.
#[derive(Debug)]
pub struct Metrics {
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    /// Bytes of the response direction (upstream to client), as Istio defines "sent".
    tcp_sent: Family<TcpLabels, Counter>,
    /// Bytes of the request direction (client to upstream).
    tcp_received: Family<TcpLabels, Counter>,
    requests: Family<HttpLabels, Counter>,
    request_duration: HttpHistograms,
    request_bytes: HttpHistograms,
    response_bytes: HttpHistograms,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(envoy_histogram),
            request_bytes: Family::new_with_constructor(envoy_histogram),
            response_bytes: Family::new_with_constructor(envoy_histogram),
        }
    }
}

/// The request metrics of one label set (handles: they share their values with the families).
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The series a connection's last request reported into, with its labels. A keep-alive
/// connection's requests mostly share one label set; finding it in the four families takes
/// four SipHash passes over every label string and four turns of the families' locks, which
/// every connection shares (4 % of the client agent's CPU at 32 connections). Comparing
/// against the kept labels is cheap: their metadata are shared `Arc`s, equal by address
/// first. Families never drop a series, so a kept handle stays exported.
///
/// One per connection; only that connection's requests take its lock.
#[derive(Default)]
pub struct LastSeries(Mutex<Option<Box<(HttpLabels, RequestSeries)>>>);

impl fmt::Debug for LastSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LastSeries")
    }
}

/// One finished request, as the HTTP metrics record it.
pub struct RequestDone<'a> {
    pub labels: &'a HttpLabels,
    pub duration: std::time::Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

impl Metrics {
    pub fn tcp(&self, labels: &TcpLabels) -> TcpCounters {
        TcpCounters {
            opened: self.tcp_opened.get_or_create_owned(labels),
            closed: self.tcp_closed.get_or_create_owned(labels),
            sent: self.tcp_sent.get_or_create_owned(labels),
            received: self.tcp_received.get_or_create_owned(labels),
        }
    }

    /// Records one finished HTTP request of a connection whose requests last reported into
    /// `last`: a request with the same labels as the one before skips the families.
    pub fn request(&self, r: &RequestDone<'_>, last: &LastSeries) {
        let mut last = last.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, series) = match &mut *last {
            Some(kept) if kept.0 == *r.labels => &**kept,
            slot => &**slot.insert(Box::new((r.labels.clone(), self.series(r.labels)))),
        };
        series.requests.inc();
        series.duration.observe(r.duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(r.request_bytes as f64);
        series.response_bytes.observe(r.response_bytes as f64);
    }

    /// The four request series of `labels`, created if new.
    fn series(&self, labels: &HttpLabels) -> RequestSeries {
        RequestSeries {
            requests: self.requests.get_or_create_owned(labels),
            duration: self.request_duration.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
        }
    }

    /// A registry exposing these metrics plus `istio_build`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            self.tcp_opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            self.tcp_closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Total bytes sent during response of a TCP connection",
            self.tcp_sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Total bytes received during request of a TCP connection",
            self.tcp_received.clone(),
        );
        r.register("istio_requests", "Total requests", self.requests.clone());
        r.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            self.request_duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request body size in bytes",
            self.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response body size in bytes",
            self.response_bytes.clone(),
        );
        let build: Family<BuildLabels, prometheus_client::metrics::gauge::Gauge> =
            Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("istio_build", "Istio component build info", build);
        r
    }
}

/// Rewrites prometheus-client's OpenMetrics text into the Prometheus text format 0.0.4 that
/// Envoy's `/stats/prometheus` serves (and that promtool checks): counters are named with
/// their `_total` suffix in HELP/TYPE, and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
/// Hand-written because prometheus-client only encodes OpenMetrics.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_total_names() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{x=\"1\"} 5\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 5\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    fn done(labels: &HttpLabels) -> RequestDone<'_> {
        RequestDone {
            labels,
            duration: std::time::Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
        }
    }

    /// A connection's requests land in the series of their own labels, kept or not.
    #[test]
    fn a_connections_requests_count_in_their_own_series() {
        let m = Metrics::default();
        let mut ok = HttpLabels {
            conn: TcpLabels::source(),
            grpc: false,
            response_code: 200,
            grpc_status: None,
        };
        ok.conn.source = Some(Arc::new(WorkloadMeta::of(&pod(&[("app", "a")]))));
        let failed = HttpLabels {
            response_code: 503,
            ..ok.clone()
        };
        // Equal labels built anew (a new config snapshot's metadata) are the same series.
        let mut rebuilt = ok.clone();
        rebuilt.conn.source = Some(Arc::new(WorkloadMeta::of(&pod(&[("app", "a")]))));
        let (one, other) = (LastSeries::default(), LastSeries::default());
        for l in [&ok, &ok, &failed, &ok, &rebuilt] {
            m.request(&done(l), &one);
        }
        m.request(&done(&failed), &other);
        assert_eq!(m.requests.get_or_create(&ok).get(), 4);
        assert_eq!(m.requests.get_or_create(&failed).get(), 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &Arc::new(m).registry())
            .expect("encodes");
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_response_bytes_count"))
            .collect();
        assert_eq!(counts.len(), 2, "{text}");
        assert!(
            counts
                .iter()
                .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 4"))
        );
        assert!(
            counts
                .iter()
                .any(|l| l.contains("response_code=\"503\"") && l.ends_with(" 2"))
        );
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            id: crate::config::model::ObjectRef {
                namespace: "default".into(),
                name: "reviews-v2-abc".into(),
            },
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node: None,
            ip: None,
            uid: None,
            host_network: false,
            ready: true,
            service_account: "default".into(),
            netns: None,
            ports: vec![],
        }
    }

    #[test]
    fn canonical_labels_follow_istio() {
        let m = WorkloadMeta::of(&pod(&[("app", "reviews"), ("version", "v2")]));
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("reviews", "v2")
        );
        let m = WorkloadMeta::of(&pod(&[
            ("app", "reviews"),
            ("service.istio.io/canonical-name", "reviews-svc"),
            ("app.kubernetes.io/version", "2.0"),
        ]));
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("reviews-svc", "2.0")
        );
        let m = WorkloadMeta::of(&pod(&[]));
        assert_eq!(m.app, "unknown");
        assert_eq!(
            (m.canonical_service.as_str(), m.canonical_revision.as_str()),
            ("reviews-v2-abc", "latest")
        );
    }
}
