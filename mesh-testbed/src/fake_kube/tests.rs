//! The fake API server's protocol, spoken over a plain TCP socket.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use super::select::Selector;
use super::*;

#[test]
fn selectors() {
    let pod = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"nodeName": "n1"}});
    let f = |s: &str| Selector::parse(s).matches_fields(&pod);
    let l = |s: &str| Selector::parse(s).matches_labels(&pod);
    assert!(f("spec.nodeName=n1") && f("spec.nodeName==n1") && f("spec.nodeName!=n2"));
    assert!(!f("spec.nodeName=n2") && f("spec.hostNetwork="));
    assert!(l("app") && l("app=web") && l("!tier") && l("app,!tier") && l(""));
    assert!(!l("tier") && !l("app=db") && !l("!app") && !l("app!=web"));
}

/// `GET path` on a fresh connection; returns the status line and a reader at the body.
fn get(server: &FakeApiServer, path: &str) -> (String, BufReader<TcpStream>) {
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        if h == "\r\n" {
            break;
        }
    }
    (status, r)
}

/// The next watch line of a chunked body: `(type, object)`, or None at its end.
fn next_event(r: &mut BufReader<TcpStream>) -> Option<(String, Value)> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut chunk = vec![0; n + 2];
    r.read_exact(&mut chunk).ok()?;
    let v: Value = serde_json::from_slice(&chunk[..n]).ok()?;
    Some((v["type"].as_str()?.to_owned(), v["object"].clone()))
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "a", "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": []}})
}

#[test]
fn list_then_watch_with_replay_selectors_bookmarks_and_gone() {
    let server = FakeApiServer::start().expect("start");
    server.apply(pod("p1", "n1")).expect("apply");
    server.apply(pod("p2", "n2")).expect("apply");
    let (status, mut body) = get(&server, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1");
    assert!(status.contains("200"), "{status}");
    let mut text = String::new();
    body.read_to_string(&mut text).ok();
    assert!(
        text.contains("\"p1\"") && !text.contains("\"p2\""),
        "{text}"
    );
    assert!(text.contains("\"resourceVersion\":\"2\""), "{text}");

    // Changes after version 2, then live ones; p2 moving to n1 is ADDED for this selector.
    server.apply(pod("p2", "n1")).expect("move");
    let path = "/api/v1/pods?watch=true&resourceVersion=2&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3Dn1";
    let (_, mut w) = get(&server, path);
    let (kind, obj) = next_event(&mut w).expect("replayed");
    assert_eq!(
        (kind.as_str(), obj["metadata"]["name"].as_str()),
        ("ADDED", Some("p2"))
    );
    assert_eq!(obj["kind"], "Pod");
    assert!(server.delete("v1", "Pod", "a", "p1"));
    let (kind, obj) = next_event(&mut w).expect("live");
    assert_eq!(
        (kind.as_str(), obj["metadata"]["resourceVersion"].as_str()),
        ("DELETED", Some("4"))
    );
    assert_eq!(server.bookmark(), 1);
    let (kind, obj) = next_event(&mut w).expect("bookmark");
    assert_eq!(
        (kind.as_str(), obj["metadata"]["resourceVersion"].as_str()),
        ("BOOKMARK", Some("4"))
    );
    assert_eq!(server.expire_watches(), 1);
    let (kind, obj) = next_event(&mut w).expect("gone");
    assert_eq!((kind.as_str(), obj["code"].as_u64()), ("ERROR", Some(410)));
    assert!(next_event(&mut w).is_none(), "the stream ends after 410");
    // Resuming from before the compaction is refused the same way.
    let (_, mut w) = get(&server, "/api/v1/pods?watch=true&resourceVersion=3");
    assert_eq!(next_event(&mut w).map(|e| e.0).as_deref(), Some("ERROR"));

    let (status, _) = get(&server, "/apis/security.istio.io/v1");
    assert!(status.contains("200"), "{status}");
    server.serve_versions("security.istio.io", "PeerAuthentication", &["v1beta1"]);
    server.serve_versions("security.istio.io", "AuthorizationPolicy", &["v1beta1"]);
    let (status, _) = get(&server, "/apis/security.istio.io/v1");
    assert!(status.contains("404"), "{status}");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName=n1"))
    );
}

/// `METHOD path` with a JSON body on a fresh connection: (status code, JSON reply).
fn send(
    server: &FakeApiServer,
    method: &str,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ctype}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut text = String::new();
    BufReader::new(s).read_to_string(&mut text).expect("read");
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";

fn config_map(name: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "a"}, "data": {"k": value, "other": "x"}})
}

#[test]
fn create_conflict_merge_patch_and_a_lost_race() {
    let server = FakeApiServer::start().expect("start");
    let cms = "/api/v1/namespaces/a/configmaps";
    let (code, created) = send(&server, "POST", cms, JSON, &config_map("c", "1"));
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["kind"], "ConfigMap");
    assert_eq!(created["metadata"]["resourceVersion"], "1");
    assert_eq!(
        server.get("v1", "ConfigMap", "a", "c").expect("stored")["data"]["k"],
        "1"
    );
    let (code, reply) = send(&server, "POST", cms, JSON, &config_map("c", "2"));
    assert_eq!(
        (code, reply["reason"].as_str(), reply["code"].as_u64()),
        (409, Some("AlreadyExists"), Some(409)),
        "{reply}"
    );
    let other_ns = "/api/v1/namespaces/b/configmaps";
    let (code, _) = send(&server, "POST", other_ns, JSON, &config_map("d", "1"));
    assert_eq!(code, 400);

    // A merge patch changes one key, removes another, and keeps the rest.
    let patch = json!({"data": {"k": "2", "other": null}});
    let (code, patched) = send(&server, "PATCH", &format!("{cms}/c"), MERGE, &patch);
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["data"], json!({"k": "2"}));
    assert_eq!(patched["metadata"]["resourceVersion"], "2");
    let stale = json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "3"}});
    let (code, reply) = send(&server, "PATCH", &format!("{cms}/c"), MERGE, &stale);
    assert_eq!((code, reply["reason"].as_str()), (409, Some("Conflict")));
    let (code, _) = send(&server, "PATCH", &format!("{cms}/none"), MERGE, &patch);
    assert_eq!(code, 404);
    let (code, _) = send(&server, "PATCH", &format!("{cms}/c"), JSON, &patch);
    assert_eq!(code, 415);

    // The lost race: the create finds the winner's object.
    server.race_create(config_map("r", "winner")).expect("race");
    assert!(server.get("v1", "ConfigMap", "a", "r").is_none());
    let (code, _) = send(&server, "POST", cms, JSON, &config_map("r", "loser"));
    assert_eq!(code, 409);
    assert_eq!(
        server.get("v1", "ConfigMap", "a", "r").expect("winner")["data"]["k"],
        "winner"
    );

    // A TLS Secret needs its two keys.
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                        "metadata": {"name": "s"}, "data": {"tls.crt": "eA=="}});
    let (code, reply) = send(
        &server,
        "POST",
        "/api/v1/namespaces/a/secrets",
        JSON,
        &secret,
    );
    assert_eq!(code, 422);
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("data[tls.key]: Required value")),
        "{reply}"
    );
    server.fail("configmaps", Some(500));
    let (code, _) = send(&server, "POST", cms, JSON, &config_map("e", "1"));
    assert_eq!(code, 500);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r == "PATCH /api/v1/namespaces/a/configmaps/c")
    );
}
