//! Istio kinds: PeerAuthentication (`security.istio.io/v1` and `v1beta1`, same schema),
//! decoded into [`model::PeerAuthentication`]. Local mode decodes it from YAML (unknown
//! fields are errors there), Kubernetes mode from the API server's JSON (unknown fields are
//! ignored: the CRD's schema already validated them, and newer Istio releases add fields).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, de};

use super::{IstioObject, Problem, Problems, done, model, object_ref};
use model::MtlsMode;

/// The API versions PeerAuthentication is read from.
pub const SECURITY_API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `kind: PeerAuthentication`, as written in manifests or served by the API server.
pub type PeerAuthentication = IstioObject<Spec>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    selector: Option<WorkloadSelector>,
    mtls: Option<Mtls>,
    port_level_mtls: Option<PortLevel>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Deserialize)]
struct Mtls {
    mode: Option<String>,
}

/// `portLevelMtls` in file order, so that `8080` and `"8080"` are caught as duplicates.
#[derive(Debug, Default)]
struct PortLevel(Vec<(PortKey, Mtls)>);

impl<'de> Deserialize<'de> for PortLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = PortLevel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of port numbers to mtls settings")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PortLevel, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(PortLevel(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A `portLevelMtls` key as written: a YAML integer or string, checked by the conversion.
#[derive(Debug)]
struct PortKey(String);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                Ok(PortKey(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn parse_mode(mtls: Option<&Mtls>, field: &str, problems: &mut Vec<Problem>) -> MtlsMode {
    match mtls.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => MtlsMode::Unset,
        Some("DISABLE") => MtlsMode::Disable,
        Some("PERMISSIVE") => MtlsMode::Permissive,
        Some("STRICT") => MtlsMode::Strict,
        Some(other) => {
            let reason = format!("{other:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT");
            problems.invalid(field, reason);
            MtlsMode::Unset
        }
    }
}

pub(super) fn convert_peer_authentication(
    pa: &PeerAuthentication,
) -> Result<model::PeerAuthentication, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&pa.metadata, &mut problems);
    // Kubernetes keeps whole seconds; fixed-width UTC text sorts chronologically.
    let created = pa
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| format!("{:.0}", t.0));
    let default = Spec::default();
    let spec = pa.spec.as_ref().unwrap_or(&default);
    let selector = spec.selector.as_ref().and_then(|s| s.match_labels.clone());
    let selector = selector.filter(|labels| !labels.is_empty());
    let mode = parse_mode(spec.mtls.as_ref(), "spec.mtls.mode", &mut problems);
    let port_level: &[(PortKey, Mtls)] = spec.port_level_mtls.as_ref().map_or(&[], |p| &p.0);
    if selector.is_none() && !port_level.is_empty() {
        let reason = "needs spec.selector.matchLabels: port-level mTLS applies to selected \
                      workloads only";
        problems.invalid("spec.portLevelMtls", reason);
    }
    let mut port_modes = BTreeMap::new();
    for (PortKey(key), mtls) in port_level {
        let field = format!("spec.portLevelMtls.{key}");
        let mode = parse_mode(Some(mtls), &format!("{field}.mode"), &mut problems);
        match key.parse::<u16>() {
            Ok(port) if port > 0 => {
                if port_modes.insert(port, mode).is_some() {
                    problems.invalid(field, format!("duplicate port {port}"));
                }
            }
            _ => problems.invalid(field, format!("{key:?} is not a port number in 1..65535")),
        }
    }
    let pa = model::PeerAuthentication {
        id,
        selector,
        mode,
        port_modes,
        created,
    };
    done(pa, problems)
}
