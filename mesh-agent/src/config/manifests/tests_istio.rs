//! PeerAuthentication: decoding, validation and mode resolution.
use super::super::model::{MtlsMode, ObjectRef, Pod, ROOT_NAMESPACE, Snapshot};
use super::{ConfigError, LoadedManifests, Sources, load_sources};
use MtlsMode::{Disable, Permissive, Strict, Unset};

/// A PeerAuthentication in `ns`; `more` is appended to `metadata` (lines indented by 2) and
/// `spec` is the spec block (lines indented by 2, may be empty).
fn pa(ns: &str, name: &str, more: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata:\n  name: {name}\n  namespace: {ns}\n{more}spec:\n{spec}"
    )
}

fn created(ts: &str) -> String {
    format!("  creationTimestamp: \"{ts}\"\n")
}

fn mode(m: &str) -> String {
    format!("  mtls: {{mode: {m}}}\n")
}

fn pod(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bookinfo, \
         labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c}}]}}\n"
    )
}

fn load(docs: &[&str]) -> Result<LoadedManifests, ConfigError> {
    load_sources(&Sources::from_texts([("a.yaml", docs.join("---\n"))]))
}

fn err(docs: &[&str]) -> String {
    let result = load(docs).map(|_| ());
    result.expect_err("expected an error").to_string()
}

fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

fn id(ns: &str, name: &str) -> ObjectRef {
    let (namespace, name) = (ns.into(), name.into());
    ObjectRef { namespace, name }
}

/// Snapshot of pods `reviews` (app: reviews) and `ratings` (app: ratings) in bookinfo plus
/// the given policies.
fn snap(policies: &[&str]) -> Snapshot {
    let (reviews, ratings) = (pod("reviews", "reviews"), pod("ratings", "ratings"));
    let mut docs = vec![reviews.as_str(), ratings.as_str()];
    docs.extend_from_slice(policies);
    load(&docs).expect("loads").snapshot
}

fn modes(snap: &Snapshot, pod: &str, ports: &[u16]) -> Vec<MtlsMode> {
    let pod: &Pod = &snap.pods[&id("bookinfo", pod)];
    ports.iter().map(|&p| snap.inbound_mode(pod, p)).collect()
}

const SELECT_REVIEWS: &str = "  selector: {matchLabels: {app: reviews}}\n";

#[test]
fn parses_v1_and_v1beta1() {
    let spec = format!(
        "{SELECT_REVIEWS}{}  portLevelMtls:\n    8080: {{mode: PERMISSIVE}}\n    \
         \"9090\": {{mode: DISABLE}}\n    7070: {{}}\n",
        mode("STRICT")
    );
    let v1 = pa(
        "bookinfo",
        "w",
        &created("2024-05-01T10:00:00.5+02:00"),
        &spec,
    );
    let beta = pa("bookinfo", "ns", "", &mode("DISABLE"));
    let beta = beta.replace("istio.io/v1", "istio.io/v1beta1") + "status: {x: 1}\n";
    let bare = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n\
        metadata: {name: bare}\n";
    let loaded = load(&[&v1, &beta, bare]).expect("loads");
    assert_eq!(loaded.stats.peer_authentications, 3);
    let pas = &loaded.snapshot.peer_authentications;
    let w = &pas[&id("bookinfo", "w")];
    let labels = [("app".to_owned(), "reviews".to_owned())].into();
    assert_eq!(w.selector, Some(labels));
    assert_eq!(w.mode, Strict);
    let ports: Vec<_> = w.port_modes.iter().map(|(p, m)| (*p, *m)).collect();
    assert_eq!(ports, [(7070, Unset), (8080, Permissive), (9090, Disable)]);
    assert_eq!(w.created.as_deref(), Some("2024-05-01T08:00:00Z"));
    let ns = &pas[&id("bookinfo", "ns")];
    assert_eq!(
        (&ns.selector, ns.mode, &ns.created),
        (&None, Disable, &None)
    );
    let bare = &pas[&id("default", "bare")];
    assert_eq!((bare.mode, bare.port_modes.len()), (Unset, 0));
    // As /config_dump shows them: modes under Istio's names.
    let dump = pas.values().collect::<Vec<_>>();
    let text = serde_json::to_string(&dump).expect("serializes");
    has(&text, "\"mode\":\"STRICT\"");
    has(&text, "\"8080\":\"PERMISSIVE\"");
    // Other apiVersions of the kind are not Istio's: ignored.
    let other = pa("x", "y", "", "").replace("security.istio.io/v1", "example.com/v1");
    let loaded = load(&[&other]).expect("loads");
    assert_eq!(
        (loaded.stats.ignored, loaded.stats.peer_authentications),
        (1, 0)
    );
}

#[test]
fn unknown_fields_named_by_path() {
    let spec = "  selector: {matchLabel: {app: reviews}}\n  mtls: {mdoe: STRICT}\n";
    let e = err(&[&pa("bookinfo", "p", "  lables: {a: b}\n", spec)]);
    let at = "a.yaml: document 1 (PeerAuthentication bookinfo/p): field";
    has(
        &e,
        &format!("{at} metadata.lables: unknown field of PeerAuthentication"),
    );
    has(
        &e,
        &format!("{at} spec.selector.matchLabel: unknown field of PeerAuthentication"),
    );
    has(
        &e,
        &format!("{at} spec.mtls.mdoe: unknown field of PeerAuthentication"),
    );
    assert_eq!(e.lines().count(), 3, "{e}");
    let e = err(&[&pa("bookinfo", "p", "", "  mtls: STRICT\n")]);
    has(
        &e,
        &format!("{at} spec.mtls: invalid type: string \"STRICT\""),
    );
}

#[test]
fn bad_modes_name_field_and_value() {
    let spec = format!(
        "{SELECT_REVIEWS}{}  portLevelMtls: {{8080: {{mode: strict}}}}\n",
        mode("STRICTT")
    );
    let e = err(&[&pa("bookinfo", "p", "", &spec)]);
    let at = "a.yaml: document 1 (PeerAuthentication bookinfo/p): field";
    let want = format!(
        "{at} spec.mtls.mode: \"STRICTT\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT\n\
         {at} spec.portLevelMtls.8080.mode: \"strict\" is not one of UNSET, DISABLE, \
         PERMISSIVE, STRICT"
    );
    assert_eq!(e, want);
}

#[test]
fn port_level_mtls_needs_a_selector() {
    let ports = "  portLevelMtls: {8080: {mode: STRICT}}\n";
    let reason = "field spec.portLevelMtls: needs spec.selector.matchLabels";
    for selector in ["", "  selector: {}\n", "  selector: {matchLabels: {}}\n"] {
        let e = err(&[&pa("bookinfo", "p", "", &format!("{selector}{ports}"))]);
        has(&e, reason);
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // An empty portLevelMtls is fine without a selector (as in Istio).
    load(&[&pa("bookinfo", "p", "", "  portLevelMtls: {}\n")]).expect("loads");
}

#[test]
fn port_keys_must_be_port_numbers() {
    let spec = format!(
        "{SELECT_REVIEWS}  portLevelMtls:\n    abc: {{mode: STRICT}}\n    0: {{mode: STRICT}}\n    \
         70000: {{mode: STRICT}}\n    \"-1\": {{mode: STRICT}}\n    \"\": {{mode: STRICT}}\n"
    );
    let e = err(&[&pa("bookinfo", "p", "", &spec)]);
    for (key, value) in [("abc", "abc"), ("0", "0"), ("70000", "70000"), ("-1", "-1")] {
        has(
            &e,
            &format!(
                "field spec.portLevelMtls.{key}: \"{value}\" is not a port number in 1..65535"
            ),
        );
    }
    has(&e, "field spec.portLevelMtls.: \"\" is not a port number");
    assert_eq!(e.lines().count(), 5, "{e}");
    let dup = format!("{SELECT_REVIEWS}  portLevelMtls: {{8080: {{}}, \"8080\": {{}}}}\n");
    let e = err(&[&pa("bookinfo", "p", "", &dup)]);
    has(&e, "field spec.portLevelMtls.8080: duplicate port 8080");
}

#[test]
fn duplicates_across_files() {
    let (a, b) = (
        pa("bookinfo", "p", "", ""),
        pa("bookinfo", "p", "", &mode("STRICT")),
    );
    let files = [("a.yaml", a), ("b.yaml", b)];
    let e = load_sources(&Sources::from_texts(files)).map(|_| ());
    let e = e.expect_err("duplicate").to_string();
    let want = "b.yaml: document 1 (PeerAuthentication bookinfo/p): duplicate \
        PeerAuthentication bookinfo/p: already defined in a.yaml document 1 \
        (PeerAuthentication bookinfo/p)";
    assert_eq!(e, want);
    // Same name in another namespace is another object; no namespace means `default`.
    let implicit = pa("default", "p", "", "").replace("  namespace: default\n", "");
    let other = [
        pa("bookinfo", "p", "", ""),
        pa("default", "p", "", ""),
        implicit,
    ];
    let e = err(&other.each_ref().map(String::as_str));
    has(
        &e,
        "a.yaml: document 3 (PeerAuthentication default/p): duplicate",
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn no_policy_is_permissive() {
    let s = snap(&[]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    // Policies of other namespaces, and selector policies of the root namespace, do not
    // apply to bookinfo pods.
    let s = snap(&[
        &pa("other", "ns", "", &mode("STRICT")),
        &pa(
            "other",
            "w",
            "",
            &format!("{SELECT_REVIEWS}{}", mode("STRICT")),
        ),
        &pa(
            ROOT_NAMESPACE,
            "w",
            "",
            &format!("{SELECT_REVIEWS}{}", mode("STRICT")),
        ),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
}

#[test]
fn namespace_policy_over_mesh_policy() {
    let mesh = pa(ROOT_NAMESPACE, "default", "", &mode("STRICT"));
    let s = snap(&[&mesh]);
    assert_eq!(modes(&s, "reviews", &[80]), [Strict]);
    let s = snap(&[&mesh, &pa("bookinfo", "ns", "", &mode("PERMISSIVE"))]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    // UNSET, written or implied, inherits the mesh's mode.
    for unset in [mode("UNSET"), String::new(), "  mtls: {}\n".into()] {
        let s = snap(&[&mesh, &pa("bookinfo", "ns", "", &unset)]);
        assert_eq!(modes(&s, "reviews", &[80]), [Strict], "{unset:?}");
    }
    let s = snap(&[&pa(ROOT_NAMESPACE, "m", "", &mode("UNSET"))]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    let s = snap(&[&pa("bookinfo", "ns", "", &mode("DISABLE"))]);
    assert_eq!(modes(&s, "ratings", &[80]), [Disable]);
}

#[test]
fn workload_policy_applies_to_selected_pods_only() {
    let ns = pa("bookinfo", "ns", "", &mode("PERMISSIVE"));
    let workload = pa(
        "bookinfo",
        "w",
        "",
        &format!("{SELECT_REVIEWS}{}", mode("STRICT")),
    );
    let s = snap(&[&ns, &workload]);
    assert_eq!(modes(&s, "reviews", &[80]), [Strict]);
    assert_eq!(modes(&s, "ratings", &[80]), [Permissive]);
    // A selector needs all its labels.
    let two = "  selector: {matchLabels: {app: reviews, version: v1}}\n";
    let s = snap(&[
        &ns,
        &pa("bookinfo", "w", "", &format!("{two}{}", mode("STRICT"))),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    // An UNSET workload policy inherits the namespace's, then the mesh's mode.
    let unset = pa("bookinfo", "w", "", SELECT_REVIEWS);
    let s = snap(&[&ns, &unset]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    let s = snap(&[&pa(ROOT_NAMESPACE, "m", "", &mode("STRICT")), &unset]);
    assert_eq!(modes(&s, "reviews", &[80]), [Strict]);
}

#[test]
fn port_level_modes_override_the_workload_mode() {
    let spec = format!(
        "{SELECT_REVIEWS}{}  portLevelMtls: {{8080: {{mode: PERMISSIVE}}, 7070: {{mode: UNSET}}}}\n",
        mode("STRICT")
    );
    let s = snap(&[&pa("bookinfo", "w", "", &spec)]);
    assert_eq!(
        modes(&s, "reviews", &[8080, 9090, 7070]),
        [Permissive, Strict, Strict]
    );
    assert_eq!(modes(&s, "ratings", &[8080]), [Permissive]);
    // Under an UNSET workload mode, unlisted and UNSET ports inherit the namespace's mode.
    let spec =
        format!("{SELECT_REVIEWS}  portLevelMtls: {{8080: {{mode: DISABLE}}, 7070: {{}}}}\n");
    let ns = pa("bookinfo", "ns", "", &mode("STRICT"));
    let s = snap(&[&ns, &pa("bookinfo", "w", "", &spec)]);
    assert_eq!(
        modes(&s, "reviews", &[8080, 9090, 7070]),
        [Disable, Strict, Strict]
    );
}

#[test]
fn oldest_policy_of_a_level_wins() {
    let (old, new) = (
        created("2024-01-01T00:00:00Z"),
        created("2024-06-01T00:00:00Z"),
    );
    // Namespace level: the oldest, whatever the names.
    let s = snap(&[
        &pa("bookinfo", "a", &new, &mode("STRICT")),
        &pa("bookinfo", "b", &old, &mode("DISABLE")),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Disable]);
    // Same age: the first by name; no timestamp counts as oldest.
    let s = snap(&[
        &pa("bookinfo", "b", &old, &mode("STRICT")),
        &pa("bookinfo", "a", &old, &mode("DISABLE")),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Disable]);
    let s = snap(&[
        &pa("bookinfo", "a", &old, &mode("STRICT")),
        &pa("bookinfo", "b", "", &mode("DISABLE")),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Disable]);
    // Mesh level likewise.
    let s = snap(&[
        &pa(ROOT_NAMESPACE, "a", &new, &mode("STRICT")),
        &pa(ROOT_NAMESPACE, "b", &old, &mode("PERMISSIVE")),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Permissive]);
    // Workload level: the oldest matching policy, even if its mode is UNSET (it then
    // inherits; the newer policy is not consulted).
    let app = "  selector: {matchLabels: {app: reviews}}\n";
    let s = snap(&[
        &pa("bookinfo", "a", &new, &format!("{app}{}", mode("DISABLE"))),
        &pa("bookinfo", "b", &old, app),
        &pa("bookinfo", "ns", "", &mode("STRICT")),
    ]);
    assert_eq!(modes(&s, "reviews", &[80]), [Strict]);
}
