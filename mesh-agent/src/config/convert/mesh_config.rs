//! MeshConfig, from either place Istio users keep it:
//! - the ConfigMap `istio` in the root namespace (`nodemesh-system`), key `mesh`, holding
//!   MeshConfig YAML (what istiod reads);
//! - an `IstioOperator` (`install.istio.io/v1alpha1`) document's `spec.meshConfig`, as in the
//!   reference guide's production configuration. Its other fields are installation settings
//!   nodemesh's deploy/ replaces; they are accepted and not used.
//!
//! Of MeshConfig, nodemesh acts on the access log fields. Istio's other fields are accepted
//! (a real MeshConfig carries them) and not used; a field Istio does not have is an error, so
//! a misspelled `accesLogFile` does not silently leave logging off.

use std::sync::Arc;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{Problem, Problems, done, model};
use crate::config::manifests::decode;
use crate::telemetry::access_log::AccessLogConfig;

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
    // Accepted, not used (yet): Istio's other MeshConfig fields.
    #[serde(rename = "enableTracing")]
    _enable_tracing: Option<serde_yaml::Value>,
    #[serde(rename = "defaultConfig")]
    _default_config: Option<serde_yaml::Value>,
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
    #[serde(rename = "defaultProviders")]
    _default_providers: Option<serde_yaml::Value>,
    #[serde(rename = "extensionProviders")]
    _extension_providers: Option<serde_yaml::Value>,
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
    let settings = model::MeshSettings {
        source: Some(source.clone()),
        access_log,
    };
    done(Found { source, settings }, problems)
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
