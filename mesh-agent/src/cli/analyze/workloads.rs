//! Services, DestinationRules and Namespaces against the workloads of the input, after
//! Istio's analyzers: DestinationRule hosts and subsets (IST0174, IST0173), Service port
//! names (IST0118), and namespaces not enabled for the mesh (IST0102, nodemesh's label).

use super::input::Workload;
use super::routing::{Found, lookup, services};
use super::{
    NAMESPACE_NOT_ENABLED, PORT_NAME_NOT_UNDER_CONVENTION, SUBSET_SELECTS_NO_PODS, Sink,
    UNKNOWN_DESTINATION_RULE_HOST,
};
use crate::config::model::{ENROLL_LABEL, ObjectRef, ROOT_NAMESPACE, TargetPort};
use crate::proxy::protocol::AppProtocol;

/// Namespaces of the platform, not of applications: Istio's analyzers skip them.
const SYSTEM_NAMESPACES: [&str; 6] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
    "istio-system",
    ROOT_NAMESPACE,
];

pub fn check(sink: &mut Sink<'_>) {
    destination_rules(sink);
    port_names(sink);
    namespaces(sink);
}

fn destination_rules(sink: &mut Sink<'_>) {
    let input = sink.input;
    let services = services(input);
    for dr in input.snapshot.destination_rules.values() {
        let svc = match lookup(input, &services, &dr.host) {
            Found::Service(svc) => svc,
            Found::Missing => {
                let text = format!(
                    "The host {} defined in the DestinationRule does not match any services \
                     in the mesh.",
                    dr.host_written
                );
                sink.report(
                    "DestinationRule",
                    &dr.id,
                    UNKNOWN_DESTINATION_RULE_HOST,
                    text,
                );
                continue;
            }
            Found::Invalid | Found::External => continue,
        };
        for subset in &dr.subsets {
            let selects = |w: &&Workload| {
                let mut wanted = svc.selector.iter().chain(&subset.labels);
                w.namespace == svc.id.namespace && wanted.all(|(k, v)| w.labels.get(k) == Some(v))
            };
            if !input.workloads.iter().any(|w| selects(&w)) {
                let text = format!(
                    "The Subset {} defined in the DestinationRule does not select any pods. \
                     Which may lead to 503 UH (NoHealthyUpstream).",
                    subset.name
                );
                sink.report("DestinationRule", &dr.id, SUBSET_SELECTS_NO_PODS, text);
            }
        }
    }
}

/// Ports whose protocol neither `appProtocol` nor the name declares: the agent sniffs their
/// first bytes (the same selection as the data path, [`AppProtocol::of`]).
fn port_names(sink: &mut Sink<'_>) {
    let services = sink.input.snapshot.services.values();
    for svc in services.filter(|s| !SYSTEM_NAMESPACES.contains(&s.id.namespace.as_str())) {
        for port in &svc.ports {
            if AppProtocol::of(port) != AppProtocol::Detect {
                continue;
            }
            let target = match &port.target_port {
                TargetPort::Number(n) => n.to_string(),
                TargetPort::Name(name) => name.clone(),
            };
            let text = format!(
                "Port name {} (port: {}, targetPort: {target}) doesn't follow the naming \
                 convention of Istio port.",
                port.name.as_deref().unwrap_or_default(),
                port.port
            );
            sink.report("Service", &svc.id, PORT_NAME_NOT_UNDER_CONVENTION, text);
        }
    }
}

/// Namespaces given as objects that say nothing about enrollment.
fn namespaces(sink: &mut Sink<'_>) {
    let namespaces = sink.input.snapshot.namespaces.values();
    for ns in namespaces.filter(|n| !SYSTEM_NAMESPACES.contains(&n.name.as_str())) {
        let id = ObjectRef {
            namespace: String::new(),
            name: ns.name.clone(),
        };
        if !sink.input.declares("Namespace", &id) || ns.labels.contains_key(ENROLL_LABEL) {
            continue;
        }
        let n = &ns.name;
        let text = format!(
            "The namespace is not enabled for nodemesh. Run 'kubectl label namespace {n} \
             {ENROLL_LABEL}=true' to enable it, or 'kubectl label namespace {n} \
             {ENROLL_LABEL}=false' to explicitly mark it as not needing it."
        );
        sink.report("Namespace", &id, NAMESPACE_NOT_ENABLED, text);
    }
}
