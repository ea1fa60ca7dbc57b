//! Access logs on the testbed (root): MeshConfig from the `istio` ConfigMap and from the
//! reference guide's IstioOperator, Istio's default TEXT format, JSON, a connect failure,
//! and a bad format rejected at runtime with its position while logging goes on.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mesh_testbed::Testbed;

const WAIT: Duration = Duration::from_secs(15);

/// client on node-1, server on node-2 (meshed, port 7000), a Service for each port of the
/// server: 7000 (a listener) and 7001 (nothing listens: connect failure).
fn manifests() -> String {
    docs(&[
        namespace("default", true),
        pod_sa("default", "client", "node-1", "client", 9999),
        pod_sa("default", "server", "node-2", "server", 7000),
        service("default", "server", "server", 7000),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dead\n  namespace: default\nspec:\n  \
         selector:\n    app: server\n  ports:\n  - name: tcp-dead\n    port: 7001\n    targetPort: 7001\n"
            .to_string(),
    ])
}

fn mesh_config_map(file: &Path, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: nodemesh-system\n\
         data:\n  mesh: |\n    accessLogFile: {}\n{extra}",
        file.display()
    )
}

/// Writes a manifest atomically, straight into the agents' directory.
fn write_manifest(tb: &Testbed, name: &str, text: &str) {
    let dir = tb.manifests_dir();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// Waits until both agents log through `file` (their config has the new MeshConfig).
fn wait_for_log_config(tb: &Testbed, file: &str) {
    for node in ["node-1", "node-2"] {
        wait_until(&format!("{node} to use {file}"), WAIT, || {
            admin_json(tb, node, "/config_dump")["mesh"]["access_log"]["file"] == file
        });
    }
}

/// The lines of `file` once it has at least `n`.
fn lines(file: &Path, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    wait_until(&format!("{n} lines in {}", file.display()), WAIT, || {
        got = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        got.len() >= n
    });
    got
}

fn log_path(tb: &Testbed, name: &str) -> PathBuf {
    let dir = tb.state_dir().join("tmp");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

#[test]
fn access_logs_follow_mesh_config_text_json_and_the_reference_guide() {
    let Some(tb) = up("access_log", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _server = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let client_ip = tb
        .pod_ip("default", "client")
        .expect("client ip")
        .to_string();
    let server_ip = tb
        .pod_ip("default", "server")
        .expect("server ip")
        .to_string();
    let svc = tb.service_ip("default", "server").expect("server svc");
    let dead = tb.service_ip("default", "dead").expect("dead svc");

    // 1. Istio's default TEXT format, from the `istio` ConfigMap.
    let text_log = log_path(&tb, "access.log");
    write_manifest(&tb, "mesh.yaml", &mesh_config_map(&text_log, ""));
    wait_for_log_config(&tb, text_log.to_str().expect("utf-8"));
    let got = read_from(&tb, "client", &format!("{svc}:7000")).expect("read through the mesh");
    let sent = got.len();
    let all = lines(&text_log, 2);
    let source = all
        .iter()
        .find(|l| l.contains(" outbound|7000||server.default.svc.cluster.local "))
        .unwrap_or_else(|| panic!("no source entry in {all:#?}"));
    // [time] "- - -" 0 - - - "-" RECEIVED SENT DURATION - "-" "-" "-" "-" "UPSTREAM" CLUSTER
    // UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_REMOTE - -
    let expected = format!("\"- - -\" 0 - - - \"-\" 0 {sent} ");
    assert!(
        source.starts_with('[') && source.contains(&expected),
        "{source}"
    );
    assert!(
        source.contains(&format!(
            "\"{server_ip}:7000\" outbound|7000||server.default.svc.cluster.local - {svc}:7000 {client_ip}:"
        )),
        "{source}"
    );
    assert!(source.ends_with(" - -"), "{source}");
    let dest = all
        .iter()
        .find(|l| l.contains(" inbound|7000|| "))
        .unwrap_or_else(|| panic!("no destination entry in {all:#?}"));
    assert!(dest.contains(&expected), "{dest}");
    assert!(
        dest.contains(&format!(
            "\"{server_ip}:7000\" inbound|7000|| - {server_ip}:7000 {client_ip}:"
        )),
        "{dest}"
    );

    // 2. A connect failure: UF at both ends, with the reason at the source.
    assert!(
        read_from(&tb, "client", &format!("{dead}:7001")).is_err(),
        "nothing listens on 7001"
    );
    let all = lines(&text_log, 4);
    let failed = all
        .iter()
        .find(|l| l.contains(" outbound|7001||dead.default.svc.cluster.local "))
        .unwrap_or_else(|| panic!("no entry for the failed connection in {all:#?}"));
    assert!(failed.contains("\"- - -\" 0 UF - - \""), "{failed}");
    assert!(
        !failed.contains(" UF - - \"-\" "),
        "the failure reason is logged: {failed}"
    );

    // 3. JSON, switched at runtime, with typed values.
    let json_log = log_path(&tb, "access.json");
    write_manifest(
        &tb,
        "mesh.yaml",
        &mesh_config_map(&json_log, "    accessLogEncoding: JSON\n"),
    );
    wait_for_log_config(&tb, json_log.to_str().expect("utf-8"));
    let got = read_from(&tb, "client", &format!("{svc}:7000")).expect("read through the mesh");
    let entries: Vec<serde_json::Value> = lines(&json_log, 2)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let src = entries
        .iter()
        .find(|e| e["upstream_cluster"] == "outbound|7000||server.default.svc.cluster.local")
        .expect("source entry");
    assert_eq!(src["bytes_received"], 0);
    assert_eq!(src["bytes_sent"], got.len());
    assert_eq!(src["response_code"], 0);
    assert_eq!(src["response_flags"], "-");
    assert_eq!(src["upstream_host"], format!("{server_ip}:7000"));
    assert_eq!(src["downstream_local_address"], format!("{svc}:7000"));
    assert!(src["method"].is_null() && src["duration"].is_u64(), "{src}");
    assert!(
        src["downstream_remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{client_ip}:"))),
        "{src}"
    );

    // 4. A bad format is refused with its position; the JSON log goes on.
    let bad = mesh_config_map(
        &text_log,
        "    accessLogFormat: \"[%START_TIME%] %BYTES_SENT% %DURATON%\"\n",
    );
    write_manifest(&tb, "mesh.yaml", &bad);
    let mut error = String::new();
    wait_until("the bad format to be reported", WAIT, || {
        error = admin_json(&tb, "node-1", "/config_dump")["config_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !error.is_empty()
    });
    assert!(
        error.contains("mesh.yaml")
            && error.contains("field data.mesh.accessLogFormat: line 1, column 29: unknown command operator %DURATON%"),
        "{error}"
    );
    read_from(&tb, "client", &format!("{svc}:7000")).expect("traffic flows");
    lines(&json_log, 4);

    // 5. The reference guide's IstioOperator, verbatim: to the agent's stdout, three lines
    // per entry as its format says.
    std::fs::remove_file(tb.manifests_dir().join("mesh.yaml")).expect("remove mesh.yaml");
    let guide = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-operator-production.yaml"),
    )
    .expect("guide yaml");
    write_manifest(&tb, "operator.yaml", &guide);
    wait_for_log_config(&tb, "/dev/stdout");
    let got = read_from(&tb, "client", &format!("{svc}:7000")).expect("read through the mesh");
    let mut entry = None;
    wait_until("a guide-format entry in the agent log", WAIT, || {
        let log = tb.agent_log("node-1");
        let lines: Vec<&str> = log.lines().collect();
        entry = lines.windows(3).find_map(|w| {
            (w[0].starts_with('[') && w[0].ends_with("] \"- - -\""))
                .then(|| (w[1].to_string(), w[2].to_string()))
        });
        entry.is_some()
    });
    let (second, third) = entry.expect("entry");
    assert_eq!(second, format!("0 - 0 {}", got.len()));
    let (duration, rest) = third.split_once(' ').expect("third line");
    assert!(duration.parse::<u64>().is_ok(), "{third}");
    assert_eq!(rest, "\"-\" \"-\"");
    tb.down().expect("down");
}
