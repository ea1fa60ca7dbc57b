//! Rendering Kubernetes manifests for the agent's local mode: Pods get a node, an IP and
//! their network namespace; Services get a ClusterIP; everything else is copied unchanged.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::ipam::Ipam;

/// Annotation naming the pod's network namespace (a path under /var/run/netns).
pub const NETNS_ANNOTATION: &str = "nodemesh.io/netns";

/// A Pod found in a manifest, before scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRequest {
    pub namespace: String,
    pub name: String,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// The pod's interface inside its namespace: [`INTERFACE_ANNOTATION`], else `eth0`.
    pub interface: String,
}

/// Pod annotation naming the pod's interface (for tests of CNIs that do not call it `eth0`).
pub const INTERFACE_ANNOTATION: &str = "testbed.nodemesh.io/interface";

impl PodRequest {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where a pod was placed; what rendering injects into its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    pub netns_path: String,
}

/// Checks that a manifest file name is a plain file name (it is written into the manifests
/// directory under the same name).
pub fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
        || name == ".."
    {
        bail!(
            "invalid manifest file name {name:?}: must be a plain file name not starting with '.'"
        );
    }
    Ok(())
}

/// Parses a multi-document YAML string; empty documents are dropped.
pub fn parse_docs(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let v = Value::deserialize(de).with_context(|| format!("YAML document {}", i + 1))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn is_core_kind(doc: &Value, kind: &str) -> bool {
    str_at(doc, &["kind"]) == Some(kind)
        && matches!(str_at(doc, &["apiVersion"]), None | Some("v1"))
}

fn namespace_of(doc: &Value) -> String {
    str_at(doc, &["metadata", "namespace"])
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string()
}

fn name_of(doc: &Value, kind: &str, index: usize) -> Result<String> {
    match str_at(doc, &["metadata", "name"]) {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => bail!("{kind} in YAML document {} has no metadata.name", index + 1),
    }
}

/// The Pods of a set of documents, in order. Duplicate namespace/name is an error.
pub fn pod_requests(docs: &[Value]) -> Result<Vec<PodRequest>> {
    let mut out: Vec<PodRequest> = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if !is_core_kind(doc, "Pod") {
            continue;
        }
        let req = PodRequest {
            namespace: namespace_of(doc),
            name: name_of(doc, "Pod", i)?,
            node_name: str_at(doc, &["spec", "nodeName"])
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            host_network: doc
                .get("spec")
                .and_then(|s| s.get("hostNetwork"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            interface: str_at(doc, &["metadata", "annotations", INTERFACE_ANNOTATION])
                .unwrap_or("eth0")
                .to_string(),
        };
        crate::netns::check_ifname(&req.interface)?;
        if out.iter().any(|p| p.key() == req.key()) {
            bail!("pod {} is defined twice", req.key());
        }
        out.push(req);
    }
    Ok(out)
}

fn mapping_at<'a>(v: &'a mut Value, key: &str) -> Result<&'a mut Mapping> {
    let Value::Mapping(m) = v else {
        bail!("expected a mapping");
    };
    let entry = m
        .entry(Value::from(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    match entry {
        Value::Mapping(m) => Ok(m),
        _ => bail!("{key} is not a mapping"),
    }
}

fn set(m: &mut Mapping, key: &str, v: Value) {
    m.insert(Value::from(key), v);
}

fn set_if_absent(m: &mut Mapping, key: &str, v: Value) {
    let k = Value::from(key);
    if m.get(&k).is_none_or(Value::is_null) {
        m.insert(k, v);
    }
}

fn render_pod(doc: &mut Value, p: &Placement, key: &str) -> Result<()> {
    let ip = p.pod_ip.to_string();
    {
        let meta = mapping_at(doc, "metadata").with_context(|| format!("pod {key}"))?;
        let ann = meta
            .entry(Value::from("annotations"))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if ann.is_null() {
            *ann = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(ann) = ann else {
            bail!("pod {key}: metadata.annotations is not a mapping");
        };
        set(ann, NETNS_ANNOTATION, Value::from(p.netns_path.clone()));
    }
    let spec = mapping_at(doc, "spec").with_context(|| format!("pod {key}"))?;
    set(spec, "nodeName", Value::from(p.node_name.clone()));
    let status = mapping_at(doc, "status").with_context(|| format!("pod {key}"))?;
    set(status, "podIP", Value::from(ip.clone()));
    let mut one = Mapping::new();
    set(&mut one, "ip", Value::from(ip));
    set(status, "podIPs", Value::Sequence(vec![Value::Mapping(one)]));
    set(status, "hostIP", Value::from(p.node_ip.to_string()));
    set_if_absent(status, "phase", Value::from("Running"));
    Ok(())
}

fn render_service(doc: &mut Value, ipam: &mut Ipam, index: usize) -> Result<()> {
    let namespace = namespace_of(doc);
    let name = name_of(doc, "Service", index)?;
    let key = format!("{namespace}/{name}");
    let spec = mapping_at(doc, "spec").with_context(|| format!("service {key}"))?;
    let current = spec
        .get(Value::from("clusterIP"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if current == "None" {
        return Ok(()); // headless
    }
    if !current.is_empty() {
        if let Ok(ip) = current.parse::<Ipv4Addr>() {
            ipam.service_ip(&namespace, &name, Some(ip))?;
        }
        return Ok(());
    }
    let ip = ipam.service_ip(&namespace, &name, None)?.to_string();
    set(spec, "clusterIP", Value::from(ip.clone()));
    set_if_absent(spec, "clusterIPs", Value::Sequence(vec![Value::from(ip)]));
    Ok(())
}

/// Renders documents: Pods get the placement from `placements` (keyed "namespace/name"; a pod
/// without one is an error), Services get ClusterIPs from `ipam`, all else is unchanged.
pub fn render(
    docs: Vec<Value>,
    placements: &BTreeMap<String, Placement>,
    ipam: &mut Ipam,
) -> Result<String> {
    let mut out = String::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        if is_core_kind(&doc, "Pod") {
            let key = format!("{}/{}", namespace_of(&doc), name_of(&doc, "Pod", i)?);
            let Some(p) = placements.get(&key) else {
                bail!("pod {key} was not placed");
            };
            render_pod(&mut doc, p, &key)?;
        } else if is_core_kind(&doc, "Service") {
            render_service(&mut doc, ipam, i)?;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(&doc)
                .with_context(|| format!("serializing YAML document {}", i + 1))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {nodemesh.io/enabled: "true"}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  containers: [{name: web, image: x}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: shop
  annotations: {keep: "me"}
spec:
  nodeName: node-2
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
---
"#;

    fn place(reqs: &[PodRequest], ipam: &mut Ipam) -> BTreeMap<String, Placement> {
        let mut m = BTreeMap::new();
        for r in reqs {
            let node = ipam.schedule(&r.key(), r.node_name.as_deref()).unwrap();
            let ip = ipam.pod_ip(&r.key(), node).unwrap();
            m.insert(
                r.key(),
                Placement {
                    node_name: crate::ipam::node_name(node),
                    node_ip: crate::ipam::node_ip(node),
                    pod_ip: ip,
                    netns_path: format!("/var/run/netns/t-{}", r.name),
                },
            );
        }
        m
    }

    #[test]
    fn renders_pods_services_and_copies_the_rest() {
        let docs = parse_docs(YAML).unwrap();
        assert_eq!(docs.len(), 6);
        let reqs = pod_requests(&docs).unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].key(), "shop/web");
        assert_eq!(reqs[1].node_name.as_deref(), Some("node-2"));
        let mut ipam = Ipam::new(2).unwrap();
        let placements = place(&reqs, &mut ipam);
        let out = render(docs.clone(), &placements, &mut ipam).unwrap();
        let rendered = parse_docs(&out).unwrap();
        assert_eq!(rendered.len(), 6);

        let web = &rendered[1];
        assert_eq!(str_at(web, &["spec", "nodeName"]), Some("node-1"));
        assert_eq!(str_at(web, &["status", "podIP"]), Some("10.244.1.2"));
        assert_eq!(str_at(web, &["status", "phase"]), Some("Running"));
        assert_eq!(
            web["metadata"]["annotations"][NETNS_ANNOTATION].as_str(),
            Some("/var/run/netns/t-web")
        );
        assert_eq!(web["metadata"]["labels"]["app"].as_str(), Some("web"));

        let db = &rendered[2];
        assert_eq!(str_at(db, &["spec", "nodeName"]), Some("node-2"));
        assert_eq!(str_at(db, &["status", "podIP"]), Some("10.244.2.2"));
        assert_eq!(db["metadata"]["annotations"]["keep"].as_str(), Some("me"));

        let svc = &rendered[3];
        let ip = str_at(svc, &["spec", "clusterIP"]).unwrap();
        assert!(ip.starts_with("10.96."), "{ip}");
        assert_eq!(svc["spec"]["clusterIPs"][0].as_str(), Some(ip));
        assert_eq!(
            ipam.lookup_service("shop", "web").map(|i| i.to_string()),
            Some(ip.to_string())
        );
        assert_eq!(str_at(&rendered[4], &["spec", "clusterIP"]), Some("None"));
        assert_eq!(rendered[0], docs[0]);
        assert_eq!(rendered[5], docs[5]);

        // Re-rendering keeps the same ClusterIP.
        let again = render(docs, &placements, &mut ipam).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn explicit_cluster_ip_is_kept_and_recorded() {
        let docs = parse_docs(
            "kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {clusterIP: 10.96.7.7}\n",
        )
        .unwrap();
        let mut ipam = Ipam::new(1).unwrap();
        let out = render(docs, &BTreeMap::new(), &mut ipam).unwrap();
        assert!(out.contains("clusterIP: 10.96.7.7"), "{out}");
        assert_eq!(
            ipam.lookup_service("default", "a"),
            Some(Ipv4Addr::new(10, 96, 7, 7))
        );
    }

    #[test]
    fn errors_name_the_resource() {
        let docs = parse_docs("kind: Pod\napiVersion: v1\nmetadata: {namespace: x}\n").unwrap();
        let err = pod_requests(&docs).unwrap_err().to_string();
        assert!(err.contains("metadata.name"), "{err}");

        let docs =
            parse_docs("kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: a}\n")
                .unwrap();
        let err = pod_requests(&docs).unwrap_err().to_string();
        assert!(err.contains("default/a"), "{err}");

        let docs = parse_docs("kind: Pod\nmetadata: {name: a}\n").unwrap();
        let mut ipam = Ipam::new(1).unwrap();
        assert!(render(docs, &BTreeMap::new(), &mut ipam).is_err());

        assert!(parse_docs("a: [1,\n").is_err());
        assert!(check_file_name("../x.yaml").is_err());
        assert!(check_file_name(".hidden.yaml").is_err());
        assert!(check_file_name("apps.yaml").is_ok());
    }

    #[test]
    fn non_core_pod_kinds_are_copied() {
        let docs =
            parse_docs("apiVersion: example.com/v1\nkind: Pod\nmetadata: {name: a}\n").unwrap();
        assert!(pod_requests(&docs).unwrap().is_empty());
        let mut ipam = Ipam::new(1).unwrap();
        let out = render(docs.clone(), &BTreeMap::new(), &mut ipam).unwrap();
        assert_eq!(parse_docs(&out).unwrap(), docs);
    }
}
