//! Unit tests of the manifests loader.
use std::net::Ipv4Addr;

use super::super::convert::parse_netns;
use super::super::model::{ENROLL_LABEL, ObjectRef, TargetPort};
use super::*;

const NS: &str = "apiVersion: v1\nkind: Namespace\n\
    metadata: {name: bookinfo, labels: {nodemesh.io/enabled: \"true\"}}\n";
const SVC: &str = "apiVersion: v1\nkind: Service\n\
    metadata: {name: reviews, namespace: bookinfo}\n\
    spec:\n  clusterIP: 10.96.0.10\n  selector: {app: reviews}\n\
    \x20 ports: [{name: http, port: 80, targetPort: http}]\n";

/// A pod of `app: reviews` on node1 with a container port named http; `spec` and
/// `status` lines (indented by 2) are appended to those blocks.
fn pod(name: &str, ip: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: bookinfo\n\
         \x20 labels: {{app: reviews}}\n  annotations: {{nodemesh.io/netns: {name}}}\n\
         spec:\n  nodeName: node1\n  containers:\n  - name: app\n    image: reviews\n\
         \x20   ports: [{{name: http, containerPort: 9080}}]\n\
         {spec}status:\n  podIP: {ip}\n{status}"
    )
}

fn load(files: &[(&str, &str)]) -> Result<LoadedManifests, ConfigError> {
    load_sources(&Sources::from_texts(files.iter().copied()))
}

fn err(files: &[(&str, &str)]) -> String {
    let result = load(files).map(|_| ());
    result.expect_err("expected an error").to_string()
}

fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

fn id(name: &str) -> ObjectRef {
    let (namespace, name) = ("bookinfo".into(), name.into());
    ObjectRef { namespace, name }
}

fn stream(docs: &[&str]) -> String {
    docs.join("---\n")
}

#[test]
fn happy_path_named_target_port() {
    let sa = "  serviceAccountName: bookinfo-reviews\n";
    let (r3, r1) = (
        pod("r3", "10.1.0.13", "", ""),
        pod("r1", "10.1.0.11", "", ""),
    );
    let yaml = stream(&[NS, &r3, &r1, &pod("r2", "10.1.0.12", sa, ""), SVC]);
    let loaded = load(&[("m/app.yaml", &yaml)]).expect("loads");
    let snap = &loaded.snapshot;
    let svc = &snap.services[&id("reviews")];
    assert_eq!(svc.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
    assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
    let eps = svc.endpoints[0]
        .iter()
        .map(|e| format!("{} {}", e.pod.as_ref().expect("pod"), e.addr));
    let want = ["bookinfo/r1 10.1.0.11:9080", "bookinfo/r2 10.1.0.12:9080"];
    assert_eq!(
        eps.collect::<Vec<_>>(),
        [want[0], want[1], "bookinfo/r3 10.1.0.13:9080"]
    );
    assert_eq!(svc.endpoints[0][0].node.as_deref(), Some("node1"));
    let dst = "10.96.0.10:80".parse().expect("addr");
    let (found, idx) = snap.service_for(dst).expect("indexed");
    assert_eq!((found.id.name.as_str(), idx), ("reviews", 0));
    let r2 = snap.pod_by_ip(Ipv4Addr::new(10, 1, 0, 12)).expect("by ip");
    assert_eq!(r2.service_account, "bookinfo-reviews");
    assert_eq!(r2.netns.as_deref(), Some(Path::new("/var/run/netns/r2")));
    let r1 = &snap.pods[&id("r1")];
    assert_eq!(
        (r1.service_account.as_str(), r1.ports[0].port),
        ("default", 9080)
    );
    assert!(snap.namespaces["bookinfo"].enrolled());
    assert_eq!(snap.enrolled_pods("node1").count(), 3);
    let s = loaded.stats;
    let counts = [
        s.files,
        s.documents,
        s.ignored,
        s.pods,
        s.services,
        s.endpoints,
    ];
    assert_eq!(counts, [1, 5, 0, 3, 1, 3]);
    assert_eq!(snap.generation, 0);
}

#[test]
fn readiness_numeric_ports_and_implicit_namespace() {
    let ready = |s| format!("  conditions: [{{type: Ready, status: \"{s}\"}}]\n");
    let running = format!("  phase: Running\n{}", ready("True"));
    let no_status = "apiVersion: v1\nkind: Pod\n\
        metadata: {name: e, namespace: bookinfo, labels: {app: reviews}}\n\
        spec: {containers: [{name: x}]}\n";
    let ports = "[{name: a, port: 80, targetPort: 8080}, {name: b, port: 9080}, \
        {port: 53, protocol: UDP}]";
    let svc = SVC.replace("10.96.0.10", "None");
    let svc = svc.replace("[{name: http, port: 80, targetPort: http}]", ports);
    let yaml = stream(&[
        &pod("a", "10.1.0.1", "", &ready("False")),
        &pod("b", "10.1.0.2", "", "  phase: Pending\n"),
        &pod("c", "10.1.0.3", "", &running),
        &pod("d", "10.1.0.4", "", "  phase: Running\n"),
        no_status,
        &svc,
    ]);
    let snap = load(&[("x.yaml", &yaml)]).expect("loads").snapshot;
    let ready = ["a", "b", "c", "d", "e"].map(|p| snap.pods[&id(p)].ready);
    assert_eq!(ready, [false, false, true, true, true]);
    let e = &snap.pods[&id("e")];
    assert_eq!((e.ip, e.node.as_deref()), (None, None));
    let svc = &snap.services[&id("reviews")];
    assert_eq!(
        (svc.cluster_ip, svc.ports.len()),
        (None, 2),
        "headless, UDP skipped"
    );
    assert_eq!(svc.ports[1].target_port, TargetPort::Number(9080));
    let addrs: Vec<String> = svc.endpoints[0]
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(addrs, ["10.1.0.3:8080", "10.1.0.4:8080"]);
    assert!(snap.by_cluster_ip.is_empty());
    assert!(
        !snap.namespaces["bookinfo"].enrolled(),
        "implicit namespace"
    );
    assert_eq!(snap.enrolled_pods("node1").count(), 0);
}

#[test]
fn pods_without_the_named_port_are_skipped() {
    let web = pod("b", "10.1.0.2", "", "").replace("name: http", "name: web");
    let yaml = stream(&[&pod("a", "10.1.0.1", "", ""), &web, SVC]);
    let snap = load(&[("x.yaml", &yaml)]).expect("loads").snapshot;
    let eps = &snap.services[&id("reviews")].endpoints[0];
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].pod, Some(id("a")));
}

#[test]
fn yaml_syntax_error_names_file_document_line() {
    let yaml = format!("{NS}---\nkind: Pod\nmetadata: {{name: [x}}\n---\n{SVC}");
    let e = err(&[("m/bad.yaml", &yaml)]);
    assert!(
        e.starts_with("m/bad.yaml: document 2: YAML syntax error: "),
        "{e}"
    );
    has(&e, "line 6");
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = err(&[("d.yaml", "a: 1\na: 2\n---\na: 1\na: 2\n")]);
    assert_eq!(e.lines().count(), 2, "{e}");
    has(
        &e,
        "d.yaml: document 1: YAML syntax error: duplicate entry with key \"a\"",
    );
    has(&e, "at line 1 column 1");
}

#[test]
fn unknown_fields_named_by_path() {
    let yaml = pod("x", "10.1.0.1", "", "").replace("image:", "imagee:");
    let e = err(&[("a.yaml", &yaml.replace("labels:", "lables:"))]);
    let at = "a.yaml: document 1 (Pod bookinfo/x): field";
    has(&e, &format!("{at} metadata.lables: unknown field of Pod"));
    has(
        &e,
        &format!("{at} spec.containers[0].imagee: unknown field of Pod"),
    );
    assert_eq!(e.lines().count(), 2, "{e}");
}

#[test]
fn all_errors_collected_with_field_paths() {
    let svc = SVC.replace("targetPort: http", "targetPort: [1]");
    let svc = svc.replace("namespace: bookinfo", "namespace: default");
    let bad_port = pod("p", "10.1.0.1", "", "").replace("9080", "abc");
    let e = err(&[("a.yaml", &stream(&[NS, &svc])), ("b.yaml", &bad_port)]);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    has(lines[0], "a.yaml: document 2 (Service default/reviews): ");
    has(
        lines[0],
        "field spec.ports[0].targetPort: invalid type: sequence",
    );
    has(lines[1], "b.yaml: document 1 (Pod bookinfo/p): ");
    has(
        lines[1],
        "field spec.containers[0].ports[0].containerPort: invalid type",
    );
}

#[test]
fn service_validation() {
    let e = err(&[("s.yaml", &SVC.replace("  selector: {app: reviews}\n", ""))]);
    has(
        &e,
        "s.yaml: document 1 (Service bookinfo/reviews): field spec.selector: missing",
    );
    let no_ports = "apiVersion: v1\nkind: Service\nmetadata: {name: r}\nspec: {selector: {a: r}}";
    let e = err(&[("s.yaml", no_ports)]);
    let want = "s.yaml: document 1 (Service default/r): field spec.ports: missing; \
        a service needs at least one port";
    assert_eq!(e, want);
    let bad = SVC.replace(
        "port: 80, targetPort: http",
        "port: 70000, targetPort: \"80\"",
    );
    let e = err(&[("s.yaml", &bad.replace("10.96.0.10", "10.96.0"))]);
    has(
        &e,
        "field spec.ports[0].port: port 70000 is out of range 1..65535",
    );
    has(
        &e,
        "field spec.ports[0].targetPort: \"80\" is neither a port number nor a",
    );
    has(
        &e,
        "field spec.clusterIP: \"10.96.0\" is not an IPv4 address",
    );
}

#[test]
fn enrolled_pod_needs_netns_annotation() {
    let bare = pod("x", "10.1.0.1", "", "");
    let bare = bare.replace("  annotations: {nodemesh.io/netns: x}\n", "");
    let e = err(&[("a.yaml", &stream(&[NS, &bare]))]);
    let want = "a.yaml: document 2 (Pod bookinfo/x): enrolled pod bookinfo/x has no \
        nodemesh.io/netns annotation: local mode needs it to find the pod's network namespace";
    assert_eq!(e, want);
    load(&[("a.yaml", &bare)]).expect("unenrolled namespace: no annotation needed");
    let node = "  nodeName: node1\n";
    let host = bare.replace(node, "  nodeName: node1\n  hostNetwork: true\n");
    let opt_out = format!("{{app: reviews, {ENROLL_LABEL}: \"false\"}}");
    let out = bare.replace("{app: reviews}", &opt_out);
    for ok in [host, out, bare.replace(node, "")] {
        load(&[("a.yaml", &stream(&[NS, &ok]))]).expect("no annotation needed");
    }
}

#[test]
fn netns_annotation_and_pod_ip_values() {
    let netns = |s| parse_netns(s).map(|p| p.display().to_string());
    assert_eq!(netns("pod1"), Ok("/var/run/netns/pod1".to_owned()));
    assert_eq!(netns("/proc/42/ns/net"), Ok("/proc/42/ns/net".to_owned()));
    for bad in ["", "a/b", "..", ".", "/var/run/netns/../x"] {
        assert!(parse_netns(bad).is_err(), "{bad:?}");
    }
    let yaml = pod("x", "10.1.0.1", "", "").replace("netns: x", "netns: ../x");
    let e = err(&[("a.yaml", &yaml)]);
    has(
        &e,
        "field metadata.annotations[\"nodemesh.io/netns\"]: \"../x\" must not",
    );
    let e = err(&[("a.yaml", &pod("x", "fd00::1", "", ""))]);
    has(&e, "field status.podIP: \"fd00::1\" is not an IPv4 address");
}

#[test]
fn other_kinds_and_empty_documents_ignored() {
    let yaml = "---\n# comment only\n---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {x: 1}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: v}\n---\n\
        apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n---\n";
    let loaded = load(&[("a.yaml", yaml)]).expect("loads");
    assert_eq!((loaded.stats.documents, loaded.stats.ignored), (3, 3));
    assert!(loaded.snapshot.pods.is_empty() && loaded.snapshot.namespaces.is_empty());
}

#[test]
fn missing_type_meta_and_non_objects() {
    let e = err(&[("a.yaml", "metadata: {name: x}\n---\n- 1\n")]);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    has(
        lines[0],
        "a.yaml: document 1: field apiVersion: missing; every Kubernetes object",
    );
    has(lines[1], "a.yaml: document 1: field kind: missing");
    has(lines[2], "a.yaml: document 2: not a Kubernetes object");
}

#[test]
fn duplicates_across_files() {
    let (x, y) = (pod("x", "10.1.0.1", "", ""), pod("y", "10.1.0.1", "", ""));
    let files = [("a.yaml", stream(&[NS, &x])), ("b.yaml", stream(&[&x, &y]))];
    let e = err(&files.each_ref().map(|(n, t)| (*n, t.as_str())));
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    let want = "b.yaml: document 1 (Pod bookinfo/x): duplicate Pod bookinfo/x: \
        already defined in a.yaml document 2 (Pod bookinfo/x)";
    assert_eq!(lines[0], want);
    has(
        lines[1],
        "b.yaml: document 2 (Pod bookinfo/y): field status.podIP: ",
    );
    has(
        lines[1],
        "10.1.0.1 is also the IP of the pod in a.yaml document 2",
    );
}

#[test]
fn enrolled_pods_filtering() {
    let opt_out = "{app: reviews, nodemesh.io/enabled: \"false\"}";
    let yaml = stream(&[
        NS,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
        &pod("here", "10.1.0.1", "", ""),
        &pod("there", "10.1.0.2", "", "").replace("node1", "node2"),
        &pod("host", "10.0.0.1", "  hostNetwork: true\n", ""),
        &pod("out", "10.1.0.3", "", "").replace("{app: reviews}", opt_out),
        &pod("other", "10.1.0.4", "", "").replace("bookinfo", "plain"),
    ]);
    let snap = load(&[("a.yaml", &yaml)]).expect("loads").snapshot;
    let pods = |node| snap.enrolled_pods(node).map(|p| p.id.name.as_str());
    assert_eq!(pods("node1").collect::<Vec<_>>(), ["here"]);
    assert_eq!(pods("node2").collect::<Vec<_>>(), ["there"]);
    let host_ip = Ipv4Addr::new(10, 0, 0, 1);
    assert!(
        snap.pod_by_ip(host_ip).is_none(),
        "hostNetwork IPs are not pod IPs"
    );
}

#[test]
fn load_dir_reads_sorted_manifests_only() {
    let dir = std::env::temp_dir().join(format!("nodemesh-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub.yaml")).expect("mkdir");
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
    write("b.yml", &pod("x", "10.1.0.1", "", ""));
    write("a.yaml", NS);
    let junk = [
        ".a.yaml.swp",
        ".#a.yaml",
        "a.yaml~",
        "#a.yaml#",
        "x.txt",
        ".h.yaml",
    ];
    junk.iter().for_each(|name| write(name, "{{{ not yaml"));
    let sources = read_sources(&dir).expect("read");
    let names = sources.files.iter().map(|(p, _)| p.strip_prefix(&dir).ok());
    let want = [Some(Path::new("a.yaml")), Some(Path::new("b.yml"))];
    assert_eq!(names.collect::<Vec<_>>(), want);
    let first = load_dir(&dir).expect("loads");
    assert_eq!(first.snapshot.pods.len(), 1);
    assert_eq!(
        load_dir(&dir).expect("loads").fingerprint,
        first.fingerprint
    );
    let typo = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{imagee: b}]}";
    write("b.yml", typo);
    let e = load_dir(&dir).expect_err("unknown field").to_string();
    let at = format!(
        "{}: document 1 (Pod default/x)",
        dir.join("b.yml").display()
    );
    assert!(e.starts_with(&at), "{e}");
    assert_ne!(
        read_sources(&dir).expect("read").fingerprint,
        first.fingerprint
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
    let e = load_dir(&dir).expect_err("missing directory").to_string();
    has(&e, "cannot read");
}
