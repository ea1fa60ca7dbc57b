use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::identity::Identity;
use crate::telemetry::metrics::{Reporter, ResponseFlags, ServiceMeta};

fn config(file: &str, format: Option<&str>, encoding: Option<&str>) -> Arc<AccessLogConfig> {
    Arc::new(
        AccessLogConfig::from_mesh_config(Some(file), format, encoding)
            .unwrap()
            .unwrap(),
    )
}

fn record(config: Arc<AccessLogConfig>, reporter: Reporter) -> TcpRecord {
    let mut labels = TcpLabels::source();
    labels.reporter = reporter;
    labels.service = Some(Arc::new(ServiceMeta {
        fqdn: "reviews.default.svc.cluster.local".into(),
        name: "reviews".into(),
        namespace: "default".into(),
    }));
    labels.source_principal = Some(Arc::new(Identity {
        trust_domain: "cluster.local".into(),
        namespace: "default".into(),
        service_account: "productpage".into(),
    }));
    labels.mutual_tls = reporter == Reporter::Destination;
    TcpRecord {
        config,
        start: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
        duration: Duration::from_millis(226),
        labels,
        bytes_received: 154,
        bytes_sent: 1024,
        downstream_remote: "10.244.1.5:41000".parse().unwrap(),
        downstream_local: "10.96.0.12:9080".parse().unwrap(),
        upstream_host: Some("10.244.2.7:9080".parse().unwrap()),
        upstream_local: None,
        failure_reason: None,
        connection_id: 7,
        http: None,
    }
}

fn line(r: &TcpRecord) -> String {
    let mut s = String::new();
    render::record(r, &mut s);
    s
}

#[test]
fn istio_default_text_line_for_a_tcp_connection() {
    let r = record(config("/dev/stdout", None, None), Reporter::Source);
    assert_eq!(
        line(&r),
        "[2016-04-15T20:17:00.310Z] \"- - -\" 0 - - - \"-\" 154 1024 226 - \"-\" \"-\" \"-\" \"-\" \
         \"10.244.2.7:9080\" outbound|9080||reviews.default.svc.cluster.local - 10.96.0.12:9080 \
         10.244.1.5:41000 - -\n"
    );
    let mut r = record(config("/dev/stdout", None, None), Reporter::Destination);
    r.labels.flags = ResponseFlags::UpstreamConnectFailure;
    assert!(
        line(&r).contains(" 0 UF - - \"-\" 154 1024 226 "),
        "{}",
        line(&r)
    );
    assert!(line(&r).contains(" inbound|9080|| "), "{}", line(&r));
}

#[test]
fn json_default_has_istio_keys_and_typed_values() {
    let r = record(config("/dev/stdout", None, Some("JSON")), Reporter::Source);
    let text = line(&r);
    assert!(text.ends_with("}\n"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 24);
    assert_eq!(o["bytes_received"], 154);
    assert_eq!(o["bytes_sent"], 1024);
    assert_eq!(o["duration"], 226);
    assert_eq!(o["response_code"], 0);
    assert_eq!(o["response_flags"], "-");
    assert_eq!(o["start_time"], "2016-04-15T20:17:00.310Z");
    assert_eq!(o["upstream_host"], "10.244.2.7:9080");
    assert_eq!(
        o["upstream_cluster"],
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    assert!(o["method"].is_null() && o["upstream_local_address"].is_null());
}

#[test]
fn custom_json_and_text_formats() {
    let cfg = config(
        "/tmp/x.log",
        Some(
            r#"{"peer": "%DOWNSTREAM_PEER_URI_SAN%", "who": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% to %UPSTREAM_HOST%", "id": "%CONNECTION_ID%"}"#,
        ),
        Some("JSON"),
    );
    let v: serde_json::Value =
        serde_json::from_str(&line(&record(cfg, Reporter::Destination))).unwrap();
    assert_eq!(
        v["peer"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(v["who"], "10.244.1.5 to 10.244.2.7:9080");
    assert_eq!(v["id"], 7);
    // A TEXT format without a final newline gets one, as Istio does.
    let cfg = config("/tmp/x.log", Some("%BYTES_SENT% %START_TIME(%s)%"), None);
    assert_eq!(line(&record(cfg, Reporter::Source)), "1024 1460751420\n");
}

#[test]
fn bad_settings_name_the_field_and_position() {
    let e = AccessLogConfig::from_mesh_config(
        Some("/dev/stdout"),
        Some("[%START_TIME%]\n%BYTES%"),
        None,
    )
    .unwrap_err();
    assert_eq!(e.field, "accessLogFormat");
    assert!(
        e.reason.contains("line 2, column 1") && e.reason.contains("%BYTES%"),
        "{e}"
    );
    let e = AccessLogConfig::from_mesh_config(Some("/dev/stdout"), None, Some("XML")).unwrap_err();
    assert_eq!(e.field, "accessLogEncoding");
    let e = AccessLogConfig::from_mesh_config(Some("/dev/stdout"), Some("[%X%]"), Some("JSON"))
        .unwrap_err();
    assert!(e.reason.contains("JSON object"), "{e}");
    let e =
        AccessLogConfig::from_mesh_config(Some("/dev/stdout"), Some(r#"{"a": 1}"#), Some("JSON"))
            .unwrap_err();
    assert!(e.reason.contains("must be a string"), "{e}");
    for bad in [
        "logs/access.log",
        "/proc/self/mem",
        "/var/log/../../etc/passwd",
        "/dev/sda",
    ] {
        let e = AccessLogConfig::from_mesh_config(Some(bad), None, None).unwrap_err();
        assert_eq!(e.field, "accessLogFile", "{bad}");
    }
    // Off, but a broken format is still an error.
    assert!(
        AccessLogConfig::from_mesh_config(None, None, None)
            .unwrap()
            .is_none()
    );
    assert!(AccessLogConfig::from_mesh_config(Some(""), Some("%NOPE%"), None).is_err());
}

#[test]
fn the_writer_appends_lines_and_counts_them() {
    let dir = std::env::temp_dir().join(format!("nodemesh-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let cfg = config(
        path.to_str().unwrap(),
        Some("%CONNECTION_ID% %BYTES_SENT%"),
        None,
    );
    let log = AccessLog::start().unwrap();
    for i in 0..100 {
        let mut r = record(cfg.clone(), Reporter::Source);
        r.connection_id = i;
        log.log(r);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats.written.load(Ordering::Relaxed) < 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 100);
    assert_eq!(lines[42], "42 1024");
    assert_eq!(log.stats.dropped.load(Ordering::Relaxed), 0);
    // A symlink at the configured path is not followed: the entry is counted as an error.
    let link = dir.join("link.log");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&path, &link).unwrap();
    log.log(record(
        config(link.to_str().unwrap(), None, None),
        Reporter::Source,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats.write_errors.load(Ordering::Relaxed) < 1 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(log.stats.write_errors.load(Ordering::Relaxed), 1);
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 100);
    let _ = std::fs::remove_dir_all(&dir);
}
