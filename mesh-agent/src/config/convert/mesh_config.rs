//! MeshConfig, from either place Istio users keep it:
//! - the ConfigMap `istio` in the root namespace (`nodemesh-system`), key `mesh`, holding
//!   MeshConfig YAML (what istiod reads);
//! - an `IstioOperator` (`install.istio.io/v1alpha1`) document's `spec.meshConfig`, as in the
//!   reference guide's production configuration. Its other fields are installation settings
//!   nodemesh's deploy/ replaces; they are accepted and not used.
//!
//! Of MeshConfig, nodemesh acts on the access log fields and tracing (`enableTracing`,
//! `defaultConfig.tracing.sampling`, `defaultProviders.tracing` naming an `opentelemetry`
//! entry of `extensionProviders`). Istio's other fields are accepted
//! (a real MeshConfig carries them) and not used; a field Istio does not have is an error, so
//! a misspelled `accesLogFile` does not silently leave logging off.

use std::sync::Arc;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{Problem, Problems, done, model};
use crate::config::manifests::decode;
use crate::telemetry::access_log::AccessLogConfig;
use crate::telemetry::trace::{DEFAULT_SAMPLING, TracingConfig};

/// The ConfigMap that carries MeshConfig, and its key.
pub const CONFIG_MAP: &str = "istio";
pub const CONFIG_MAP_KEY: &str = "mesh";
pub const OPERATOR_API_VERSION: &str = "install.istio.io/v1alpha1";

/// Istio's MeshConfig (`istio.io/api/mesh/v1alpha1`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    access_log_file: Option<String>,
    access_log_format: Option<String>,
    access_log_encoding: Option<String>,
    enable_tracing: Option<bool>,
    /// ProxyConfig: only `tracing.sampling` is read; its many other fields are accepted.
    default_config: Option<serde_yaml::Value>,
    default_providers: Option<DefaultProviders>,
    /// Read for the tracing provider `defaultProviders.tracing` names; the others (metrics,
    /// access log, authorization providers) are accepted.
    extension_providers: Option<Vec<serde_yaml::Value>>,
    // Accepted, not used (yet): Istio's other MeshConfig fields.
    #[serde(rename = "enableAutoMtls")]
    _enable_auto_mtls: Option<serde_yaml::Value>,
    #[serde(rename = "trustDomain")]
    _trust_domain: Option<serde_yaml::Value>,
    #[serde(rename = "trustDomainAliases")]
    _trust_domain_aliases: Option<serde_yaml::Value>,
    #[serde(rename = "outboundTrafficPolicy")]
    _outbound_traffic_policy: Option<serde_yaml::Value>,
    #[serde(rename = "enablePrometheusMerge")]
    _enable_prometheus_merge: Option<serde_yaml::Value>,
    #[serde(rename = "rootNamespace")]
    _root_namespace: Option<serde_yaml::Value>,
    #[serde(rename = "ingressClass")]
    _ingress_class: Option<serde_yaml::Value>,
    #[serde(rename = "ingressService")]
    _ingress_service: Option<serde_yaml::Value>,
    #[serde(rename = "ingressControllerMode")]
    _ingress_controller_mode: Option<serde_yaml::Value>,
    #[serde(rename = "ingressSelector")]
    _ingress_selector: Option<serde_yaml::Value>,
    #[serde(rename = "localityLbSetting")]
    _locality_lb_setting: Option<serde_yaml::Value>,
    #[serde(rename = "dnsRefreshRate")]
    _dns_refresh_rate: Option<serde_yaml::Value>,
    #[serde(rename = "protocolDetectionTimeout")]
    _protocol_detection_timeout: Option<serde_yaml::Value>,
    #[serde(rename = "connectTimeout")]
    _connect_timeout: Option<serde_yaml::Value>,
    #[serde(rename = "tcpKeepalive")]
    _tcp_keepalive: Option<serde_yaml::Value>,
    #[serde(rename = "h2UpgradePolicy")]
    _h2_upgrade_policy: Option<serde_yaml::Value>,
    #[serde(rename = "inboundClusterStatName")]
    _inbound_cluster_stat_name: Option<serde_yaml::Value>,
    #[serde(rename = "outboundClusterStatName")]
    _outbound_cluster_stat_name: Option<serde_yaml::Value>,
    #[serde(rename = "discoverySelectors")]
    _discovery_selectors: Option<serde_yaml::Value>,
    #[serde(rename = "meshMTLS")]
    _mesh_mtls: Option<serde_yaml::Value>,
    #[serde(rename = "tlsDefaults")]
    _tls_defaults: Option<serde_yaml::Value>,
    #[serde(rename = "serviceSettings")]
    _service_settings: Option<serde_yaml::Value>,
    #[serde(rename = "defaultServiceExportTo")]
    _default_service_export_to: Option<serde_yaml::Value>,
    #[serde(rename = "defaultVirtualServiceExportTo")]
    _default_virtual_service_export_to: Option<serde_yaml::Value>,
    #[serde(rename = "defaultDestinationRuleExportTo")]
    _default_destination_rule_export_to: Option<serde_yaml::Value>,
    #[serde(rename = "caCertificates")]
    _ca_certificates: Option<serde_yaml::Value>,
    #[serde(rename = "pathNormalization")]
    _path_normalization: Option<serde_yaml::Value>,
    #[serde(rename = "defaultHttpRetryPolicy")]
    _default_http_retry_policy: Option<serde_yaml::Value>,
    #[serde(rename = "verifyCertificateAtClient")]
    _verify_certificate_at_client: Option<serde_yaml::Value>,
    #[serde(rename = "enableEnvoyAccessLogService")]
    _enable_envoy_access_log_service: Option<serde_yaml::Value>,
    #[serde(rename = "proxyListenPort")]
    _proxy_listen_port: Option<serde_yaml::Value>,
    #[serde(rename = "proxyHttpPort")]
    _proxy_http_port: Option<serde_yaml::Value>,
}

/// `defaultProviders`: the providers used when no Telemetry resource says otherwise.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DefaultProviders {
    #[serde(default)]
    tracing: Vec<String>,
    #[serde(rename = "metrics")]
    _metrics: Option<serde_yaml::Value>,
    #[serde(rename = "accessLogging")]
    _access_logging: Option<serde_yaml::Value>,
}

/// `kind: IstioOperator`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioOperator {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: OperatorSpec,
    #[serde(rename = "status")]
    _status: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperatorSpec {
    mesh_config: Option<MeshConfig>,
    // Installation settings: deploy/ takes their place.
    #[serde(rename = "profile")]
    _profile: Option<serde_yaml::Value>,
    #[serde(rename = "components")]
    _components: Option<serde_yaml::Value>,
    #[serde(rename = "values")]
    _values: Option<serde_yaml::Value>,
    #[serde(rename = "hub")]
    _hub: Option<serde_yaml::Value>,
    #[serde(rename = "tag")]
    _tag: Option<serde_yaml::Value>,
    #[serde(rename = "revision")]
    _revision: Option<serde_yaml::Value>,
    #[serde(rename = "namespace")]
    _namespace: Option<serde_yaml::Value>,
    #[serde(rename = "installPackagePath")]
    _install_package_path: Option<serde_yaml::Value>,
}

/// Whether a ConfigMap is the one carrying MeshConfig.
pub fn is_mesh_config(cm: &k8s::ConfigMap) -> bool {
    cm.metadata.name.as_deref() == Some(CONFIG_MAP)
        && cm.metadata.namespace.as_deref() == Some(model::ROOT_NAMESPACE)
}

/// MeshConfig as the rest of the agent sees it, with where it came from.
pub struct Found {
    pub source: String,
    pub settings: model::MeshSettings,
}

fn settings(mesh: MeshConfig, prefix: &str, source: String) -> Result<Found, Vec<Problem>> {
    let mut problems = Vec::new();
    let access_log = match AccessLogConfig::from_mesh_config(
        mesh.access_log_file.as_deref(),
        mesh.access_log_format.as_deref(),
        mesh.access_log_encoding.as_deref(),
    ) {
        Ok(c) => c.map(Arc::new),
        Err(e) => {
            problems.invalid(format!("{prefix}{}", e.field), e.reason);
            None
        }
    };
    let tracing = tracing_settings(&mesh, prefix, &mut problems).map(Arc::new);
    let settings = model::MeshSettings {
        source: Some(source.clone()),
        access_log,
        tracing,
    };
    done(Found { source, settings }, problems)
}

/// The tracing provider `defaultProviders.tracing` selects (it must be an `opentelemetry`
/// extension provider: spans are exported with OTLP/gRPC) and the sampling percentage
/// (`defaultConfig.tracing.sampling`, Istio's default 1). `None` when tracing is off or no
/// provider is selected.
fn tracing_settings(
    mesh: &MeshConfig,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Option<TracingConfig> {
    let sampling = match mesh
        .default_config
        .as_ref()
        .and_then(|c| c.get("tracing"))
        .and_then(|t| t.get("sampling"))
    {
        None => DEFAULT_SAMPLING,
        Some(v) => match v.as_f64() {
            Some(p) if (0.0..=100.0).contains(&p) => p,
            _ => {
                problems.invalid(
                    format!("{prefix}defaultConfig.tracing.sampling"),
                    format!("{} is not a percentage from 0 to 100", yaml_text(v)),
                );
                return None;
            }
        },
    };
    let name = mesh.default_providers.as_ref()?.tracing.first()?;
    let providers = mesh.extension_providers.as_deref().unwrap_or_default();
    let Some((i, provider)) = providers
        .iter()
        .enumerate()
        .find(|(_, p)| p.get("name").and_then(|n| n.as_str()) == Some(name.as_str()))
    else {
        problems.invalid(
            format!("{prefix}defaultProviders.tracing[0]"),
            format!("no extensionProviders entry is named {name:?}"),
        );
        return None;
    };
    let field = |f: &str| format!("{prefix}extensionProviders[{i}].{f}");
    let Some(otel) = provider.get("opentelemetry") else {
        let kind = provider
            .as_mapping()
            .and_then(|m| m.keys().filter_map(|k| k.as_str()).find(|k| *k != "name"))
            .unwrap_or("none");
        problems.invalid(
            field("opentelemetry"),
            format!(
                "tracing provider {name:?} is {kind:?}; nodemesh exports spans with OTLP only (an opentelemetry provider)"
            ),
        );
        return None;
    };
    if otel.get("http").is_some() {
        problems.invalid(
            field("opentelemetry.http"),
            "OTLP over HTTP is not supported; remove `http` to export over gRPC".to_string(),
        );
        return None;
    }
    let service = otel.get("service").and_then(|s| s.as_str()).unwrap_or("");
    if service.is_empty() {
        problems.invalid(
            field("opentelemetry.service"),
            "the collector's host is required".to_string(),
        );
        return None;
    }
    let port = match otel.get("port").map(|p| (p.as_u64(), p)) {
        Some((Some(p), _)) if (1..=65535).contains(&p) => p as u16,
        other => {
            let got = other.map_or_else(|| "nothing".to_string(), |(_, v)| yaml_text(v));
            problems.invalid(
                field("opentelemetry.port"),
                format!("{got} is not a port from 1 to 65535"),
            );
            return None;
        }
    };
    if mesh.enable_tracing == Some(false) {
        return None;
    }
    Some(TracingConfig {
        provider: name.clone(),
        service: service.to_string(),
        port,
        sampling,
    })
}

fn yaml_text(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).map_or_else(|_| format!("{v:?}"), |s| s.trim().to_string())
}

pub fn convert_operator(op: &IstioOperator) -> Result<Found, Vec<Problem>> {
    let name = op.metadata.name.clone().unwrap_or_default();
    let source = format!("IstioOperator {name} spec.meshConfig");
    let mesh = op.spec.mesh_config.clone().unwrap_or_default();
    settings(mesh, "spec.meshConfig.", source)
}

/// The `istio` ConfigMap: its `mesh` key parsed as MeshConfig, problems named
/// `data.mesh.FIELD`.
pub fn convert_config_map(cm: &k8s::ConfigMap) -> Result<Found, Vec<Problem>> {
    let ns = cm.metadata.namespace.clone().unwrap_or_default();
    let source = format!("ConfigMap {ns}/{CONFIG_MAP} data.{CONFIG_MAP_KEY}");
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_MAP_KEY))
        .map_or("", String::as_str);
    if text.trim().is_empty() {
        return settings(MeshConfig::default(), "", source);
    }
    let prefixed = |problems: Vec<Problem>| -> Vec<Problem> {
        problems
            .into_iter()
            .map(|p| match p {
                Problem::UnknownField { field, kind } => Problem::UnknownField {
                    field: format!("data.{CONFIG_MAP_KEY}.{field}"),
                    kind,
                },
                Problem::Decode { field, reason } => Problem::Decode {
                    field: format!("data.{CONFIG_MAP_KEY}.{field}"),
                    reason,
                },
                other => other,
            })
            .collect()
    };
    let (mesh, unknown) =
        decode::<MeshConfig>(serde_yaml::Deserializer::from_str(text), "MeshConfig")
            .map_err(prefixed)?;
    if !unknown.is_empty() {
        return Err(prefixed(unknown));
    }
    settings(mesh, &format!("data.{CONFIG_MAP_KEY}."), source)
}

#[cfg(test)]
mod tests {
    use crate::config::manifests::{Sources, load_sources};

    fn load(yaml: &str) -> Result<crate::config::model::Snapshot, String> {
        load_sources(&Sources::from_texts([("mesh.yaml", yaml)]))
            .map(|l| l.snapshot)
            .map_err(|e| e.to_string())
    }

    /// The reference guide's production IstioOperator, verbatim.
    const GUIDE: &str = include_str!("../../../tests/data/istio-operator-production.yaml");

    #[test]
    fn the_reference_guides_istio_operator_turns_access_logs_on() {
        let snap = load(GUIDE).unwrap();
        let log = snap.mesh.access_log.expect("access log on");
        assert_eq!(log.file, "/dev/stdout");
        assert!(log.format.as_deref().unwrap().starts_with("[%START_TIME%]"));
        assert_eq!(
            snap.mesh.source.as_deref(),
            Some("IstioOperator istio-production spec.meshConfig")
        );
    }

    #[test]
    fn the_istio_config_map_in_the_root_namespace() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: nodemesh-system}\n\
                    data:\n  mesh: |\n    accessLogFile: /var/log/access.log\n    accessLogEncoding: JSON\n";
        let snap = load(yaml).unwrap();
        let log = snap.mesh.access_log.unwrap();
        assert_eq!(log.file, "/var/log/access.log");
        // Other ConfigMaps, and `istio` elsewhere, are not MeshConfig.
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: default}\n\
                     data:\n  mesh: |\n    accessLogFile: /dev/stdout\n";
        assert!(load(other).unwrap().mesh.access_log.is_none());
    }

    fn mesh(body: &str) -> String {
        let indented: String = body.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: nodemesh-system}}\n\
             data:\n  mesh: |\n{indented}"
        )
    }

    const OTEL: &str = "extensionProviders:\n- name: jaeger\n  zipkin:\n    service: zipkin.istio-system.svc.cluster.local\n    port: 9411\n- name: otel\n  opentelemetry:\n    service: jaeger-collector.istio-system.svc.cluster.local\n    port: 4317\n";

    #[test]
    fn tracing_exports_to_the_selected_opentelemetry_provider() {
        let on = format!(
            "{OTEL}defaultProviders:\n  tracing: [otel]\ndefaultConfig:\n  tracing:\n    sampling: 12.5\n  holdApplicationUntilProxyStarts: true\n"
        );
        let t = load(&mesh(&on)).unwrap().mesh.tracing.expect("tracing on");
        assert_eq!(t.provider, "otel");
        assert_eq!(t.service, "jaeger-collector.istio-system.svc.cluster.local");
        assert_eq!(t.port, 4317);
        assert_eq!(t.sampling, 12.5);
        // Istio's default sampling is 1%; no provider selected or tracing disabled: off.
        let default = format!("{OTEL}defaultProviders:\n  tracing: [otel]\n");
        assert_eq!(
            load(&mesh(&default))
                .unwrap()
                .mesh
                .tracing
                .unwrap()
                .sampling,
            1.0
        );
        assert!(load(&mesh(OTEL)).unwrap().mesh.tracing.is_none());
        let off = format!("{default}enableTracing: false\n");
        assert!(load(&mesh(&off)).unwrap().mesh.tracing.is_none());
        assert!(load(GUIDE).unwrap().mesh.tracing.is_none());
    }

    #[test]
    fn tracing_mistakes_name_their_field() {
        let cases = [
            (
                format!("{OTEL}defaultProviders:\n  tracing: [jaeger]\n"),
                "field data.mesh.extensionProviders[0].opentelemetry: tracing provider \"jaeger\" is \"zipkin\"",
            ),
            (
                format!("{OTEL}defaultProviders:\n  tracing: [nope]\n"),
                "field data.mesh.defaultProviders.tracing[0]: no extensionProviders entry is named \"nope\"",
            ),
            (
                format!("{OTEL}defaultProviders:\n  tracing: [otel]\ndefaultConfig:\n  tracing:\n    sampling: 150\n"),
                "field data.mesh.defaultConfig.tracing.sampling: 150 is not a percentage from 0 to 100",
            ),
            (
                "extensionProviders:\n- name: o\n  opentelemetry:\n    service: c\n    port: 70000\ndefaultProviders:\n  tracing: [o]\n".to_string(),
                "field data.mesh.extensionProviders[0].opentelemetry.port: 70000 is not a port from 1 to 65535",
            ),
            (
                "extensionProviders:\n- name: o\n  opentelemetry:\n    port: 4317\ndefaultProviders:\n  tracing: [o]\n".to_string(),
                "field data.mesh.extensionProviders[0].opentelemetry.service: the collector's host is required",
            ),
            (
                "extensionProviders:\n- name: o\n  opentelemetry:\n    service: c\n    port: 4318\n    http:\n      path: /v1/traces\ndefaultProviders:\n  tracing: [o]\n".to_string(),
                "field data.mesh.extensionProviders[0].opentelemetry.http: OTLP over HTTP is not supported",
            ),
        ];
        for (body, want) in cases {
            let e = load(&mesh(&body)).unwrap_err();
            assert!(e.contains(want), "{body}\n{e}");
        }
    }

    #[test]
    fn mistakes_name_the_document_and_field() {
        let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: nodemesh-system}\n\
                    data:\n  mesh: |\n    accesLogFile: /dev/stdout\n";
        let e = load(typo).unwrap_err();
        assert!(
            e.contains("document 1 (ConfigMap nodemesh-system/istio)"),
            "{e}"
        );
        assert!(
            e.contains("field data.mesh.accesLogFile: unknown field"),
            "{e}"
        );
        let bad = GUIDE.replace("%DURATION%", "%DURATON%");
        let e = load(&bad).unwrap_err();
        assert!(e.contains("field spec.meshConfig.accessLogFormat: line 3, column 1: unknown command operator %DURATON%"), "{e}");
        let both = format!(
            "{GUIDE}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: nodemesh-system}}\ndata: {{mesh: ''}}\n"
        );
        let e = load(&both).unwrap_err();
        assert!(
            e.contains("MeshConfig is already given by IstioOperator istio-production"),
            "{e}"
        );
    }
}
