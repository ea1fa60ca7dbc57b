//! The agent's own health as metrics, read at scrape time from what the control plane
//! publishes, the data path's counters and the pinned eBPF maps.

use std::fmt;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::admin::AdminState;

pub struct Health(pub AdminState);

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Health")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Health {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let view = self.0.view.borrow().clone();
        let enrolled = view
            .workloads
            .iter()
            .filter(|w| w.state == "enrolled")
            .count();
        let failed = view
            .workloads
            .iter()
            .filter(|w| w.state == "failed")
            .count();
        gauge(
            &mut enc,
            "nodemesh_enrolled_pods",
            "Pods enrolled on this node",
            int(enrolled),
        )?;
        gauge(
            &mut enc,
            "nodemesh_enroll_failures",
            "Pods that should be enrolled but are not (retried)",
            int(failed),
        )?;
        gauge(
            &mut enc,
            "nodemesh_config_generation",
            "Generation of the configuration in force",
            i64::try_from(view.config_generation).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut enc,
            "nodemesh_config_error",
            "1 while the newest configuration is rejected (the last good one stays in force)",
            i64::from(view.config_error.is_some()),
        )?;
        counter(
            &mut enc,
            "nodemesh_config_errors",
            "Rejected configurations",
            view.config_errors_total,
        )?;
        let log = &self.0.access_log;
        counter(
            &mut enc,
            "nodemesh_access_log_entries",
            "Access log entries written (MeshConfig accessLogFile)",
            log.written.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "nodemesh_access_log_dropped",
            "Access log entries dropped because the writer fell behind (the data path never waits)",
            log.dropped.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "nodemesh_access_log_write_errors",
            "Access log entries that could not be written",
            log.write_errors.load(Ordering::Relaxed),
        )?;
        let spans = &self.0.spans;
        counter(
            &mut enc,
            "nodemesh_tracing_spans_exported",
            "Spans the tracing collector accepted",
            spans.exported.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "nodemesh_tracing_spans_dropped",
            "Spans dropped: queue full, collector unknown, or export failed (the data path never waits)",
            spans.dropped(),
        )?;
        resources(&mut enc, &view.resources)?;
        let s = &self.0.stats;
        gauge(
            &mut enc,
            "nodemesh_connections_active",
            "Proxied connections open now",
            i64::try_from(s.active.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut enc,
            "nodemesh_connections_accepted",
            "Captured connections accepted",
            s.accepted.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "nodemesh_connections_no_original_destination",
            "Captured connections refused because no original destination was recorded",
            s.no_orig_dst.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "nodemesh_connections_over_limit",
            "Captured connections reset because --max-connections were open",
            s.over_limit.load(Ordering::Relaxed),
        )?;
        let e = self.0.maps.read();
        counter(
            &mut enc,
            "nodemesh_ebpf_redirected",
            "connect() calls redirected to the agent",
            e.redirected,
        )?;
        counter(
            &mut enc,
            "nodemesh_ebpf_map_errors",
            "eBPF map updates that failed",
            e.map_errors,
        )?;
        gauge(
            &mut enc,
            "nodemesh_ebpf_enrolled_entries",
            "Entries in the ENROLLED map",
            int(e.enrolled_entries),
        )?;
        gauge(
            &mut enc,
            "nodemesh_ebpf_orig_dst_entries",
            "Entries in the ORIG_DST map (captured, not yet accepted)",
            int(e.orig_dst_entries),
        )?;
        Ok(())
    }
}

/// Kubernetes mode: per watched kind (`kind`, and `scope`: the watch's selector or `all`).
fn resources(
    enc: &mut DescriptorEncoder,
    resources: &[crate::config::kube::ResourceStatus],
) -> fmt::Result {
    if resources.is_empty() {
        return Ok(());
    }
    let labels = |r: &crate::config::kube::ResourceStatus| {
        let scope = r.selector.clone().unwrap_or_else(|| "all".to_owned());
        vec![("kind", r.kind.to_owned()), ("scope", scope)]
    };
    let families: [(&str, &str, MetricType); 3] = [
        (
            "nodemesh_config_resource_synced",
            "1 once the watch of this kind finished its first full list",
            MetricType::Gauge,
        ),
        (
            "nodemesh_config_invalid_objects",
            "Objects of this kind skipped as invalid (logged with kind, name, field and reason)",
            MetricType::Gauge,
        ),
        (
            "nodemesh_config_resource_errors",
            "Watch errors and invalid objects of this kind (410 Gone relists excluded)",
            MetricType::Counter,
        ),
    ];
    for (i, (name, help, kind)) in families.into_iter().enumerate() {
        let mut family = enc.encode_descriptor(name, help, None, kind)?;
        for r in resources {
            let labels = labels(r);
            let metric = family.encode_family(&labels)?;
            match i {
                0 => ConstGauge::new(i64::from(r.synced)).encode(metric)?,
                1 => ConstGauge::new(int(r.invalid)).encode(metric)?,
                _ => ConstCounter::new(r.errors_total).encode(metric)?,
            }
        }
    }
    Ok(())
}
