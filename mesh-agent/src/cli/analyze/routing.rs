//! VirtualServices against the rest of the input, after Istio's `virtualservice` analyzers:
//! destination and mirror hosts, ports and subsets (IST0101, IST0112), gateways (IST0101, IST0132), and
//! unreachable rules and matches ([`super::rules`]: IST0130, IST0131).

use std::collections::HashMap;

use super::input::Input;
use super::{
    HOST_NOT_IN_GATEWAY, PORT_SELECTOR_REQUIRED, REFERENCED_RESOURCE_NOT_FOUND, Sink, rules,
};
use crate::config::model::{ObjectRef, Service};
use crate::config::routing::{
    CLUSTER_DOMAIN, Destination, Host, HttpAction, MESH_GATEWAY, VirtualService, service_fqdn,
};

const KIND: &str = "VirtualService";

/// What a host names.
pub enum Found<'a> {
    Service(&'a Service),
    /// A Service of the input that did not convert (already reported as IST0106).
    Invalid,
    /// A ServiceEntry's host.
    External,
    Missing,
}

/// Services by FQDN.
pub fn services(input: &Input) -> HashMap<String, &Service> {
    let services = input.snapshot.services.values();
    services.map(|s| (service_fqdn(&s.id), s)).collect()
}

/// Looks `host` up among the input's Services and ServiceEntries.
pub fn lookup<'a>(
    input: &Input,
    services: &HashMap<String, &'a Service>,
    host: &Host,
) -> Found<'a> {
    let service = match host {
        Host::Fqdn(fqdn) => services.get(fqdn).copied(),
        Host::Ip(ip) => services
            .values()
            .copied()
            .find(|s| s.cluster_ip == Some(*ip)),
        Host::Wildcard(_) => return Found::External,
    };
    if let Some(s) = service {
        return Found::Service(s);
    }
    let Host::Fqdn(fqdn) = host else {
        return Found::Missing;
    };
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let service_name = fqdn.strip_suffix(&suffix).and_then(|n| n.split_once('.'));
    if let Some((name, namespace)) = service_name {
        let id = ObjectRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if input.declares("Service", &id) {
            return Found::Invalid;
        }
    }
    let entry = |h: &Host| match h {
        Host::Fqdn(f) => f == fqdn,
        Host::Wildcard(suffix) => fqdn.ends_with(suffix.as_str()),
        Host::Ip(_) => false,
    };
    if input.service_entry_hosts.iter().any(entry) {
        Found::External
    } else {
        Found::Missing
    }
}

pub fn check(sink: &mut Sink<'_>) {
    let input = sink.input;
    let services = services(input);
    for vs in input.snapshot.virtual_services.values() {
        for d in destinations(vs) {
            destination(sink, vs, d, Use::Route, &services);
        }
        let mirrors = vs.http.iter().flat_map(|r| &r.mirrors);
        for m in mirrors {
            destination(sink, vs, &m.destination, Use::Mirror, &services);
        }
        gateways(sink, vs);
        rules::check(sink, vs);
    }
}

/// Every destination of the HTTP and TCP routes.
fn destinations(vs: &VirtualService) -> impl Iterator<Item = &Destination> {
    let http = vs.http.iter().filter_map(|r| match &r.action {
        HttpAction::Route(route) => Some(route),
        HttpAction::Redirect(_) | HttpAction::DirectResponse(_) => None,
    });
    let tcp = vs.tcp.iter().map(|r| &r.route);
    http.chain(tcp).flatten().map(|w| &w.destination)
}

/// What a destination is for; Istio's messages name mirrors as such.
#[derive(Clone, Copy, PartialEq)]
enum Use {
    Route,
    Mirror,
}

fn destination(
    sink: &mut Sink<'_>,
    vs: &VirtualService,
    d: &Destination,
    used: Use,
    services: &HashMap<String, &Service>,
) {
    let host = &d.host_written;
    let what = if used == Use::Mirror { "mirror " } else { "" };
    match lookup(sink.input, services, &d.host) {
        Found::Missing => {
            let text = format!("Referenced {what}host not found: {host:?}");
            sink.report(KIND, &vs.id, REFERENCED_RESOURCE_NOT_FOUND, text);
        }
        Found::Service(svc) => match d.port {
            Some(port) if !svc.ports.iter().any(|p| p.port == port) => {
                let text = format!("Referenced host:port not found: \"{host}:{port}\"");
                sink.report(KIND, &vs.id, REFERENCED_RESOURCE_NOT_FOUND, text);
            }
            None if svc.ports.len() > 1 => {
                let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
                let text = format!(
                    "This VirtualService routes to a service {host:?} that exposes multiple \
                     ports [{}]. Specifying a port in the destination is required to \
                     disambiguate.",
                    ports.join(" ")
                );
                sink.report(KIND, &vs.id, PORT_SELECTOR_REQUIRED, text);
            }
            _ => {}
        },
        Found::Invalid | Found::External => {}
    }
    if let Some(subset) = &d.subset {
        let rules = sink.input.snapshot.destination_rules.values();
        let defined = rules
            .filter(|dr| dr.host == d.host)
            .any(|dr| dr.subset(subset).is_some());
        if !defined {
            let kind = if used == Use::Mirror {
                "mirror"
            } else {
                "host"
            };
            let text = format!(
                "Referenced {kind}+subset in destinationrule not found: \"{host}+{subset}\""
            );
            sink.report(KIND, &vs.id, REFERENCED_RESOURCE_NOT_FOUND, text);
        }
    }
}

/// A gateway reference: `ns/name`, `name` (the VirtualService's namespace), or the legacy
/// `name.ns[.svc.cluster.local]`.
pub fn gateway_ref(written: &str, namespace: &str) -> ObjectRef {
    let (namespace, name) = match (written.split_once('/'), written.split_once('.')) {
        (Some((ns, name)), _) => (ns, name),
        (None, Some((name, rest))) => (rest.split('.').next().unwrap_or(namespace), name),
        (None, None) => (namespace, written),
    };
    ObjectRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn gateways(sink: &mut Sink<'_>, vs: &VirtualService) {
    let in_matches = vs
        .http
        .iter()
        .flat_map(|r| &r.matches)
        .flat_map(|m| &m.gateways);
    let in_tcp = vs
        .tcp
        .iter()
        .flat_map(|r| &r.matches)
        .flat_map(|m| &m.gateways);
    let top = vs.gateways.iter().map(|g| (g, true));
    let all = top.chain(in_matches.chain(in_tcp).map(|g| (g, false)));
    for (written, top_level) in all {
        if written == MESH_GATEWAY {
            continue;
        }
        let id = gateway_ref(written, &vs.id.namespace);
        match sink.input.gateways.get(&id) {
            None => {
                let text = format!("Referenced gateway not found: {written:?}");
                sink.report(KIND, &vs.id, REFERENCED_RESOURCE_NOT_FOUND, text);
            }
            Some(hosts) if top_level && !served(hosts, &id.namespace, vs) => {
                let text = format!(
                    "one or more host [{}] defined in VirtualService {} not found in Gateway {id}.",
                    vs.hosts_written.join(" "),
                    vs.id
                );
                sink.report(KIND, &vs.id, HOST_NOT_IN_GATEWAY, text);
            }
            Some(_) => {}
        }
    }
}

/// Whether any host of `vs` overlaps a host a gateway serves to the VirtualService's
/// namespace (`ns/host`, `./host` and `*/host` forms as Istio reads them).
fn served(gateway_hosts: &[String], gateway_ns: &str, vs: &VirtualService) -> bool {
    let visible = gateway_hosts
        .iter()
        .filter_map(|h| match h.split_once('/') {
            None => Some(h.as_str()),
            Some(("*", host)) => Some(host),
            Some((".", host)) if gateway_ns == vs.id.namespace => Some(host),
            Some((ns, host)) if ns == vs.id.namespace => Some(host),
            Some(_) => None,
        });
    let visible: Vec<&str> = visible.collect();
    let hosts = vs.hosts_written.iter();
    hosts
        .into_iter()
        .any(|vh| visible.iter().any(|gh| overlaps(gh, vh)))
}

/// Istio's `host.Name.Matches`: equal, or one wildcard covers the other.
pub fn overlaps(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    if a == b || a == "*" || b == "*" {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb) || sb.ends_with(sa),
        (Some(sa), None) => b.ends_with(sa),
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => false,
    }
}
