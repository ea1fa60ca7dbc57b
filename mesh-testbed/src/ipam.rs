//! Scheduling and address allocation: which node a pod lands on, pod IPs from the node's pod
//! CIDR, ClusterIPs from 10.96.0.0/16. Pure bookkeeping, no side effects.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Fabric ("node network") addresses: node i is 10.250.0.i/24.
pub const FABRIC_PREFIX: [u8; 3] = [10, 250, 0];
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// Pod CIDR of node i: 10.244.i.0/24.
pub const POD_NET: [u8; 2] = [10, 244];
/// Service ClusterIP range 10.96.0.0/16 (nothing routes it; only the agent makes it work).
pub const SERVICE_NET: [u8; 2] = [10, 96];
/// Link-local next hop every pod uses as its default gateway (answered by the node).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Most nodes a testbed can have (one /24 pod CIDR and one fabric address per node).
pub const MAX_NODES: usize = 250;

/// Name of node `i` (1-based) as pods' `spec.nodeName` and the agent's `--node` see it.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Parses `node-<i>` back to `i` when `1 <= i <= nodes`.
pub fn parse_node_name(name: &str, nodes: usize) -> Option<usize> {
    let i: usize = name.strip_prefix("node-")?.parse().ok()?;
    (1..=nodes).contains(&i).then_some(i)
}

pub fn node_ip(i: usize) -> Ipv4Addr {
    let [a, b, c] = FABRIC_PREFIX;
    Ipv4Addr::new(a, b, c, i as u8)
}

pub fn pod_cidr(i: usize) -> String {
    let [a, b] = POD_NET;
    format!("{a}.{b}.{i}.0/24")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ipam {
    nodes: usize,
    /// Round-robin cursor for pods without a usable `spec.nodeName` (0-based).
    rr: usize,
    /// Next host octet per node (index 0 = node-1).
    next_host: Vec<u16>,
    /// Next ClusterIP offset within 10.96.0.0/16.
    next_service: u32,
    /// "namespace/name" -> ClusterIP.
    services: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    pub fn new(nodes: usize) -> Result<Self> {
        if nodes == 0 || nodes > MAX_NODES {
            bail!("a testbed needs 1..={MAX_NODES} nodes, not {nodes}");
        }
        Ok(Self {
            nodes,
            rr: 0,
            next_host: vec![2; nodes],
            // Skip 10.96.0.0/24's first addresses, like kube's apiserver/DNS convention.
            next_service: 10,
            services: BTreeMap::new(),
        })
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Picks the node of a new pod: its `spec.nodeName` if given (must be `node-1..node-N`),
    /// else the next node round-robin. Returns the 1-based node index.
    pub fn schedule(&mut self, pod: &str, requested: Option<&str>) -> Result<usize> {
        if let Some(name) = requested {
            return match parse_node_name(name, self.nodes) {
                Some(i) => Ok(i),
                None => bail!(
                    "pod {pod}: spec.nodeName {name:?} is not a testbed node (node-1..node-{})",
                    self.nodes
                ),
            };
        }
        let i = self.rr % self.nodes + 1;
        self.rr = (self.rr + 1) % self.nodes;
        Ok(i)
    }

    /// Next free pod IP on node `i`.
    pub fn pod_ip(&mut self, pod: &str, i: usize) -> Result<Ipv4Addr> {
        let Some(next) = self.next_host.get_mut(i.wrapping_sub(1)) else {
            bail!("pod {pod}: no node {i}");
        };
        if *next > 254 {
            bail!("pod {pod}: pod CIDR {} of node-{i} is full", pod_cidr(i));
        }
        let [a, b] = POD_NET;
        let ip = Ipv4Addr::new(a, b, i as u8, *next as u8);
        *next += 1;
        Ok(ip)
    }

    /// The ClusterIP of Service `namespace/name`: stable for the life of the testbed.
    /// `explicit` (the manifest's own `spec.clusterIP`) is recorded as is.
    pub fn service_ip(
        &mut self,
        namespace: &str,
        name: &str,
        explicit: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let key = format!("{namespace}/{name}");
        if let Some(ip) = explicit {
            self.services.insert(key, ip);
            return Ok(ip);
        }
        if let Some(ip) = self.services.get(&key) {
            return Ok(*ip);
        }
        loop {
            if self.next_service >= 0xffff {
                bail!("service {key}: ClusterIP range 10.96.0.0/16 exhausted");
            }
            let [a, b] = SERVICE_NET;
            let n = self.next_service;
            self.next_service += 1;
            let ip = Ipv4Addr::new(a, b, (n >> 8) as u8, (n & 0xff) as u8);
            if (n & 0xff) == 0 || (n & 0xff) == 255 || self.services.values().any(|v| *v == ip) {
                continue;
            }
            self.services.insert(key, ip);
            return Ok(ip);
        }
    }

    /// Recorded ClusterIP of `namespace/name`, if any.
    pub fn lookup_service(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.services.get(&format!("{namespace}/{name}")).copied()
    }

    /// All recorded services as ("namespace/name", ClusterIP).
    pub fn services(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.services.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_explicit_nodes() {
        let mut ipam = Ipam::new(2).unwrap();
        assert_eq!(ipam.schedule("a", None).unwrap(), 1);
        assert_eq!(ipam.schedule("b", None).unwrap(), 2);
        assert_eq!(ipam.schedule("c", Some("node-2")).unwrap(), 2);
        assert_eq!(ipam.schedule("d", None).unwrap(), 1);
        let err = ipam.schedule("e", Some("node-3")).unwrap_err().to_string();
        assert!(err.contains("node-3") && err.contains("pod e"), "{err}");
        assert!(ipam.schedule("f", Some("worker")).is_err());
        assert!(Ipam::new(0).is_err());
    }

    #[test]
    fn pod_ips_per_node() {
        let mut ipam = Ipam::new(2).unwrap();
        assert_eq!(ipam.pod_ip("a", 1).unwrap(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(ipam.pod_ip("b", 1).unwrap(), Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(ipam.pod_ip("c", 2).unwrap(), Ipv4Addr::new(10, 244, 2, 2));
        assert!(ipam.pod_ip("d", 3).is_err());
        for _ in 3..=254 {
            ipam.pod_ip("x", 2).unwrap();
        }
        assert!(ipam.pod_ip("y", 2).is_err());
    }

    #[test]
    fn service_ips_are_stable_and_unique() {
        let mut ipam = Ipam::new(1).unwrap();
        let a = ipam.service_ip("default", "a", None).unwrap();
        let b = ipam.service_ip("default", "b", None).unwrap();
        let a2 = ipam.service_ip("other", "a", None).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, a2);
        assert_eq!(ipam.service_ip("default", "a", None).unwrap(), a);
        assert_eq!(a.octets()[..2], [10, 96]);
        let fixed = Ipv4Addr::new(10, 96, 0, 13);
        assert_eq!(ipam.service_ip("default", "c", Some(fixed)).unwrap(), fixed);
        let d = ipam.service_ip("default", "d", None).unwrap();
        assert_ne!(d, fixed);
        assert_eq!(ipam.lookup_service("default", "c"), Some(fixed));
    }
}
