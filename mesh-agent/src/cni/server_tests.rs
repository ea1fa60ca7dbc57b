//! The agent's answers: the decision table of ADD, and the socket with hostile input.

use std::collections::BTreeMap;

use super::*;
use crate::capture::enroll::WorkloadView;
use crate::config::model::{Namespace, Pod};

const NODE: &str = "node-1";

fn snapshot() -> Snapshot {
    let mut snap = Snapshot::default();
    for (name, enrolled) in [("shop", true), ("plain", false)] {
        let mut labels = BTreeMap::new();
        if enrolled {
            labels.insert(ENROLL_LABEL.to_owned(), "true".to_owned());
        }
        snap.namespaces.insert(
            name.into(),
            Namespace {
                name: name.into(),
                labels,
            },
        );
    }
    for (ns, name, node, host, out) in [
        ("shop", "web", NODE, false, false),
        ("shop", "far", "node-2", false, false),
        ("shop", "host", NODE, true, false),
        ("shop", "out", NODE, false, true),
        ("ghost", "p", NODE, false, false),
    ] {
        let id = ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        };
        let mut labels = BTreeMap::new();
        if out {
            labels.insert(ENROLL_LABEL.to_owned(), "false".to_owned());
        }
        snap.pods.insert(
            id.clone(),
            Pod {
                id,
                labels,
                node: Some(node.into()),
                ip: None,
                uid: None,
                host_network: host,
                ready: true,
                service_account: "default".into(),
                netns: None,
                ports: Vec::new(),
            },
        );
    }
    snap
}

fn workload(name: &str, state: &'static str, netns: &str, error: Option<&str>) -> WorkloadView {
    WorkloadView {
        namespace: "shop".into(),
        name: name.into(),
        node: NODE.into(),
        ip: None,
        service_account: "default".into(),
        netns: netns.into(),
        netns_cookie: 77,
        state,
        error: error.map(String::from),
        reason: None,
        outbound_connections: 0,
        outbound_active: 0,
        outbound_errors: 0,
        outbound_hbone: 0,
        inbound_connections: 0,
        inbound_active: 0,
        identity: None,
        protocol: "TCP",
        hbone_connections_open: 0,
        hbone_connections_opened: 0,
        hbone_streams_opened: 0,
        stats: None,
        pool: None,
    }
}

fn id(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn add_is_answered_only_once_the_pod_s_fate_is_known() {
    let snap = snapshot();
    let netns = Path::new("/var/run/netns/web");
    let mut view = ControlView::default();
    let decide_for = |view: &ControlView, pod: &ObjectRef| decide(NODE, &snap, view, pod, netns);

    // Before the first full sync nothing is known.
    let e = decide_for(&view, &id("plain", "x")).expect_err("unsynced");
    assert!(e.contains("first sync"), "{e}");
    view.config_synced = true;

    let not_meshed = |r: Result<Reply, String>, want: &str| match r {
        Ok(Reply::NotMeshed { reason }) => assert!(reason.contains(want), "{reason}"),
        other => panic!("{want}: {other:?}"),
    };
    // A namespace that is not enrolled needs no pod: even one the watch has not seen yet.
    not_meshed(
        decide_for(&view, &id("plain", "not-seen-yet")),
        "namespace plain is not labelled",
    );
    not_meshed(decide_for(&view, &id("shop", "host")), "hostNetwork");
    not_meshed(decide_for(&view, &id("shop", "out")), "opted out");

    // Not in the config for this node (yet): wait, saying why.
    for pod in [id("shop", "new"), id("shop", "far")] {
        let e = decide_for(&view, &pod).expect_err("unknown pod");
        assert!(
            e.contains("not in the agent's config for node node-1"),
            "{e}"
        );
    }
    let e = decide_for(&view, &id("ghost", "p")).expect_err("namespace not seen");
    assert!(
        e.contains("namespace ghost is not in the agent's config"),
        "{e}"
    );

    // Meshed: the enroller's state decides.
    let web = id("shop", "web");
    assert!(
        decide_for(&view, &web)
            .expect_err("no workload")
            .contains("waiting")
    );
    view.workloads = vec![workload("web", "pending", "", None)];
    assert!(decide_for(&view, &web).is_err());
    view.workloads = vec![workload(
        "web",
        "failed",
        "/var/run/netns/web",
        Some("waiting for a certificate"),
    )];
    let e = decide_for(&view, &web).expect_err("failed");
    assert!(
        e.contains("enrolling failed (retried): waiting for a certificate"),
        "{e}"
    );
    view.workloads = vec![workload("web", "enrolled", "/var/run/netns/old", None)];
    assert!(
        decide_for(&view, &web)
            .expect_err("old")
            .contains("previous sandbox")
    );
    view.workloads = vec![workload("web", "enrolled", "/var/run/netns/web", None)];
    assert_eq!(
        decide_for(&view, &web),
        Ok(Reply::Enrolled { netns_cookie: 77 })
    );
}

/// The server on a temporary socket with hand-driven config and view channels.
struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    _snap: watch::Sender<Arc<Snapshot>>,
    _view: watch::Sender<Arc<ControlView>>,
    pods: watch::Receiver<Arc<CniPods>>,
}

fn harness(tag: &str) -> Harness {
    let dir = std::env::temp_dir().join(format!("nodemesh-cni-srv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("cni.sock");
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot()));
    let view = ControlView {
        config_synced: true,
        ..ControlView::default()
    };
    let (view_tx, view_rx) = watch::channel(Arc::new(view));
    let (pods, _adopter) = start(CniServerInputs {
        socket: socket.clone(),
        node: NODE.into(),
        snapshot: snap_rx,
        view: view_rx,
    })
    .expect("start");
    Harness {
        dir,
        socket,
        _snap: snap_tx,
        _view: view_tx,
        pods,
    }
}

async fn exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn request(command: Command, namespace: &str, netns: &str) -> Vec<u8> {
    protocol::encode(&Request {
        version: protocol::PROTOCOL_VERSION,
        command,
        pod_namespace: namespace.into(),
        pod_name: "web".into(),
        container_id: "c1".into(),
        netns: netns.into(),
        ips: vec![],
        timeout_ms: 3000,
    })
}

#[tokio::test]
async fn hostile_input_is_refused_and_named() {
    let h = harness("hostile");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&h.socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "root only");

    let reply = exchange(&h.socket, b"{\"version\":1}\n").await;
    assert!(
        reply.contains("\"result\":\"failed\"") && reply.contains("invalid request"),
        "{reply}"
    );
    let reply = exchange(&h.socket, &request(Command::Add, "shop", "/etc/shadow")).await;
    assert!(reply.contains("netns: \\\"/etc/shadow\\\""), "{reply}");
    let reply = exchange(
        &h.socket,
        &request(Command::Add, "shop", "/run/netns/nodemesh-none"),
    )
    .await;
    assert!(
        reply.contains("cannot open /run/netns/nodemesh-none"),
        "{reply}"
    );
    let mut big = vec![b'x'; protocol::MAX_MESSAGE + 10];
    big.push(b'\n');
    let reply = exchange(&h.socket, &big).await;
    assert!(reply.contains("not one line of at most"), "{reply}");
    assert_eq!(h.pods.borrow().len(), 0, "nothing recorded");

    // DEL of something unknown is fine; a DEL needs no netns.
    let reply = exchange(&h.socket, &request(Command::Del, "shop", "")).await;
    assert_eq!(reply, "{\"result\":\"deleted\",\"known\":false}\n");
    // CHECK of a sandbox the agent never saw fails, naming it.
    let reply = exchange(&h.socket, &request(Command::Check, "shop", "/run/netns/x")).await;
    assert!(
        reply.contains("no record of sandbox c1 of pod shop/web"),
        "{reply}"
    );

    // The namespace list for the fail-closed rule is written once the config is synced.
    let cache = crate::cni::namespaces_file(&h.socket);
    for _ in 0..50 {
        if cache.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cache = NamespaceCache::read(&cache).expect("namespace list");
    assert_eq!(cache.namespaces.get("shop"), Some(&true));
    assert_eq!(cache.namespaces.get("plain"), Some(&false));
    let _ = std::fs::remove_dir_all(&h.dir);
}
