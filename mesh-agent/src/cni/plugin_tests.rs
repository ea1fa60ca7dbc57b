//! The plugin driven as a runtime drives it, with the agent faked: environment and stdin in,
//! stdout, log and exit status out.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::cni::conf::{parse_cni_args, parse_conf, pod_ips};
use crate::cni::namespaces::NamespaceCache;

/// The bridge plugin's result as CNI 1.0.0 prints it.
const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"nmbr0","mac":"aa:bb:cc:00:00:01"},{"name":"veth1","mac":"aa:bb:cc:00:00:02"},{"name":"eth0","mac":"aa:bb:cc:00:00:03","sandbox":"/var/run/netns/pod"}],"ips":[{"interface":2,"address":"10.99.1.2/24","gateway":"10.99.1.1"},{"interface":2,"address":"fd00::2/64"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

struct Fake {
    reply: Result<Reply, CallError>,
    seen: RefCell<Vec<Request>>,
}

impl Fake {
    fn new(reply: Result<Reply, CallError>) -> Fake {
        Fake {
            reply,
            seen: RefCell::new(Vec::new()),
        }
    }
}

impl AgentLink for Fake {
    fn call(&self, _: &Path, req: &Request, _: Duration) -> Result<Reply, CallError> {
        self.seen.borrow_mut().push(req.clone());
        match &self.reply {
            Ok(r) => Ok(r.clone()),
            Err(CallError::Unreachable(s)) => Err(CallError::Unreachable(s.clone())),
            Err(CallError::Failed(s)) => Err(CallError::Failed(s.clone())),
        }
    }
}

fn env(command: &str, args: &str) -> Result<CniEnv, CniError> {
    let vars: BTreeMap<&str, String> = [
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "abc123".to_owned()),
        ("CNI_NETNS", "/var/run/netns/pod".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", "/opt/cni/bin".to_owned()),
        ("CNI_ARGS", args.to_owned()),
    ]
    .into();
    CniEnv::parse(|k| vars.get(k).cloned())
}

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1";

fn stdin(socket: &Path, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"testnet","type":"nodemesh-cni","agentSocket":"{}","timeout":"5s","excludeNamespaces":["kube-system"]{extra},"prevResult":{PREV}}}"#,
        socket.display()
    )
}

fn temp_socket(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodemesh-plugin-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir.join("cni.sock")
}

#[test]
fn cni_args_parse() {
    let args = parse_cni_args(K8S_ARGS).expect("args");
    assert_eq!(args["K8S_POD_NAMESPACE"], "shop");
    assert_eq!(args["K8S_POD_NAME"], "web-1");
    assert_eq!(args["IgnoreUnknown"], "1");
    assert!(parse_cni_args("").expect("empty").is_empty());
    assert_eq!(parse_cni_args("A=b=c;").expect("= in value")["A"], "b=c");
    let e = parse_cni_args("K8S_POD_NAME").expect_err("no =");
    assert_eq!(e.code, code::INVALID_ENV);
    assert!(
        e.msg.contains("\"K8S_POD_NAME\" is not KEY=VALUE"),
        "{}",
        e.msg
    );
    let e = env("ADD", "K8S_POD_NAME=x")
        .expect("env")
        .pod()
        .expect_err("no ns");
    assert!(e.msg.contains("K8S_POD_NAMESPACE"), "{}", e.msg);
}

#[test]
fn environment_is_checked_per_command() {
    let e = CniEnv::parse(|_| None).expect_err("no command");
    assert!(e.msg.contains("CNI_COMMAND is not set"), "{}", e.msg);
    let e = CniEnv::parse(|k| (k == "CNI_COMMAND").then(|| "FROB".into())).expect_err("bad");
    assert!(e.msg.contains("\"FROB\""), "{}", e.msg);
    let e = CniEnv::parse(|k| (k == "CNI_COMMAND").then(|| "ADD".into())).expect_err("bare ADD");
    assert!(e.msg.contains("CNI_CONTAINERID is not set"), "{}", e.msg);
    assert!(CniEnv::parse(|k| (k == "CNI_COMMAND").then(|| "VERSION".into())).is_ok());
}

#[test]
fn config_is_parsed_strictly() {
    let socket = Path::new("/run/x/cni.sock");
    let conf = parse_conf(stdin(socket, "").as_bytes()).expect("conf");
    assert_eq!(conf.agent_socket, socket);
    assert_eq!(conf.timeout, Duration::from_secs(5));
    assert_eq!(conf.exclude_namespaces, ["kube-system"]);
    assert_eq!(conf.prev_result.as_ref().map(|p| p.get()), Some(PREV));
    let defaults = parse_conf(br#"{"cniVersion":"0.4.0","type":"nodemesh-cni"}"#).expect("min");
    assert_eq!(defaults.agent_socket, Path::new(crate::cni::DEFAULT_SOCKET));
    assert_eq!(defaults.timeout, conf::DEFAULT_TIMEOUT);
    let cases = [
        (
            stdin(socket, r#","agentSock":"/x""#),
            code::UNSUPPORTED_FIELD,
            "agentSock",
        ),
        (
            stdin(socket, r#","timeout":"soon""#),
            code::DECODE,
            "duplicate field",
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"nodemesh-cni","timeout":"soon"}"#.into(),
            code::INVALID_CONFIG,
            "field timeout: \"soon\"",
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"nodemesh-cni","agentSocket":"rel/cni.sock"}"#.into(),
            code::INVALID_CONFIG,
            "field agentSocket",
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"nodemesh-cni","excludeNamespaces":["Bad"]}"#.into(),
            code::INVALID_CONFIG,
            "field excludeNamespaces[0]",
        ),
        (
            r#"{"cniVersion":"0.2.0","type":"nodemesh-cni"}"#.into(),
            code::INCOMPATIBLE_VERSION,
            "cniVersion \"0.2.0\"",
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"bridge"}"#.into(),
            code::INVALID_CONFIG,
            "field type: \"bridge\"",
        ),
        (
            "not json".into(),
            code::DECODE,
            "network configuration on stdin",
        ),
    ];
    for (text, want_code, want) in cases {
        let e = parse_conf(text.as_bytes()).expect_err(&text);
        assert_eq!(e.code, want_code, "{text}: {}", e.msg);
        assert!(e.msg.contains(want), "{}: lacks {want}", e.msg);
    }
}

#[test]
fn pod_ips_come_from_sandbox_interfaces() {
    let prev = serde_json::value::RawValue::from_string(PREV.into()).expect("raw");
    assert_eq!(pod_ips(&prev).expect("ips"), [Ipv4Addr::new(10, 99, 1, 2)]);
    let host_only =
        r#"{"interfaces":[{"name":"br"}],"ips":[{"interface":0,"address":"10.0.0.1/24"}]}"#;
    let raw = serde_json::value::RawValue::from_string(host_only.into()).expect("raw");
    assert!(pod_ips(&raw).expect("ips").is_empty());
    let v03 = r#"{"ips":[{"version":"4","address":"10.0.0.9/24"}]}"#;
    let raw = serde_json::value::RawValue::from_string(v03.into()).expect("raw");
    assert_eq!(pod_ips(&raw).expect("ips"), [Ipv4Addr::new(10, 0, 0, 9)]);
}

#[test]
fn add_passes_the_previous_result_through_unchanged() {
    let socket = temp_socket("add");
    for reply in [
        Reply::Enrolled { netns_cookie: 42 },
        Reply::NotMeshed {
            reason: "namespace shop is not labelled".into(),
        },
    ] {
        let agent = Fake::new(Ok(reply));
        let out = run(env("ADD", K8S_ARGS), stdin(&socket, "").as_bytes(), &agent);
        assert!(out.success, "{out:?}");
        assert_eq!(out.stdout, PREV);
        let seen = agent.seen.borrow();
        let req = &seen[0];
        assert_eq!(
            (
                req.command,
                req.pod_namespace.as_str(),
                req.pod_name.as_str()
            ),
            (Command::Add, "shop", "web-1")
        );
        assert_eq!(req.container_id, "abc123");
        assert_eq!(req.netns, "/var/run/netns/pod");
        assert_eq!(req.ips, [Ipv4Addr::new(10, 99, 1, 2)]);
        assert_eq!(req.timeout_ms, 5000);
        assert!(req.validate().is_ok());
    }
}

#[test]
fn errors_are_cni_error_documents() {
    let socket = temp_socket("err");
    let agent = Fake::new(Ok(Reply::Failed {
        message: "waiting for a certificate".into(),
    }));
    let out = run(env("ADD", K8S_ARGS), stdin(&socket, "").as_bytes(), &agent);
    assert!(!out.success);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("error JSON");
    assert_eq!(doc["cniVersion"], "1.0.0");
    assert_eq!(doc["code"], code::NOT_ENROLLED);
    let msg = doc["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("could not enroll pod shop/web-1: waiting for a certificate"),
        "{msg}"
    );
    // No prevResult: not chained.
    let text = r#"{"cniVersion":"0.4.0","type":"nodemesh-cni"}"#;
    let out = run(env("ADD", K8S_ARGS), text.as_bytes(), &agent);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("error JSON");
    assert_eq!(
        (doc["cniVersion"].as_str(), doc["code"].as_u64()),
        (Some("0.4.0"), Some(7))
    );
    assert!(out.stdout.contains("chained plugin"), "{}", out.stdout);
    // An agent that accepts but does not answer: ADD fails for every pod.
    let agent = Fake::new(Err(CallError::Failed("timed out".into())));
    let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns";
    let out = run(env("ADD", args), stdin(&socket, "").as_bytes(), &agent);
    assert!(
        !out.success && out.stdout.contains("\"code\":11"),
        "{out:?}"
    );
}

#[test]
fn version_answers_supported_versions() {
    let agent = Fake::new(Err(CallError::Unreachable("unused".into())));
    let out = run(env("VERSION", ""), br#"{"cniVersion":"0.4.0"}"#, &agent);
    assert!(out.success);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(doc["cniVersion"], "0.4.0");
    let versions = doc["supportedVersions"].as_array().expect("list");
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        assert!(versions.iter().any(|x| x == v), "{v}");
    }
    assert!(agent.seen.borrow().is_empty());
}

#[test]
fn agent_absent_fails_closed_for_enrolled_and_unknown_namespaces() {
    let socket = temp_socket("absent");
    let cache_path = crate::cni::namespaces_file(&socket);
    let _ = std::fs::remove_file(&cache_path);
    let agent = Fake::new(Err(CallError::Unreachable(format!(
        "{}: Connection refused",
        socket.display()
    ))));
    let add = |ns: &str| {
        let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p");
        run(env("ADD", &args), stdin(&socket, "").as_bytes(), &agent)
    };
    // No namespace list (first boot): only excluded namespaces start.
    let out = add("shop");
    assert!(!out.success, "{out:?}");
    for part in [
        "\"code\":11",
        "unreachable at",
        "cni.sock",
        "fail closed",
        "cannot be read",
    ] {
        assert!(out.stdout.contains(part), "{part}: {}", out.stdout);
    }
    let out = add("kube-system");
    assert!(out.success && out.stdout == PREV, "{out:?}");
    // With the agent's list: enrolled fails (even if excluded), not enrolled passes, a
    // namespace the list does not have fails.
    let cache = NamespaceCache {
        version: 1,
        node: "n".into(),
        written: "2025-01-01T00:00:00Z".into(),
        namespaces: [
            ("shop".to_owned(), true),
            ("plain".to_owned(), false),
            ("kube-system".to_owned(), true),
        ]
        .into(),
    };
    cache.save(&cache_path).expect("cache");
    let out = add("shop");
    assert!(
        !out.success && out.stdout.contains("enrolled in the mesh (per"),
        "{out:?}"
    );
    assert!(!add("kube-system").success);
    let out = add("plain");
    assert!(out.success && out.stdout == PREV, "{out:?}");
    assert!(out.stderr.contains("starts unmeshed"), "{}", out.stderr);
    let out = add("created-since");
    assert!(
        !out.success && out.stdout.contains("does not have"),
        "{out:?}"
    );
    // CHECK follows the same rule.
    let out = run(
        env("CHECK", "K8S_POD_NAMESPACE=plain;K8S_POD_NAME=p"),
        stdin(&socket, "").as_bytes(),
        &agent,
    );
    assert!(out.success && out.stdout.is_empty(), "{out:?}");
    let _ = std::fs::remove_dir_all(socket.parent().expect("dir"));
}

#[test]
fn del_always_succeeds() {
    let socket = temp_socket("del");
    for reply in [
        Ok(Reply::Deleted { known: true }),
        Ok(Reply::Deleted { known: false }),
        Err(CallError::Unreachable("gone".into())),
        Err(CallError::Failed("timed out".into())),
    ] {
        let agent = Fake::new(reply);
        let mut e = env("DEL", K8S_ARGS).expect("env");
        e.netns = String::new();
        let out = run(Ok(e), stdin(&socket, "").as_bytes(), &agent);
        assert!(out.success && out.stdout.is_empty(), "{out:?}");
        assert_eq!(agent.seen.borrow()[0].command, Command::Del);
    }
    // Even without the pod's identity or a valid config: nothing to do, success.
    let agent = Fake::new(Ok(Reply::Deleted { known: true }));
    assert!(run(env("DEL", ""), stdin(&socket, "").as_bytes(), &agent).success);
    assert!(run(env("DEL", K8S_ARGS), b"garbage", &agent).success);
    let _ = std::fs::remove_dir_all(socket.parent().expect("dir"));
}

#[test]
fn the_socket_link_speaks_one_line_each_way() {
    use std::io::{BufRead, BufReader, Write};
    let socket = temp_socket("link");
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        let req: Request = serde_json::from_str(&line).expect("request");
        (&s).write_all(&protocol::encode(&Reply::Enrolled { netns_cookie: 9 }))
            .expect("write");
        req
    });
    let req = Request {
        version: PROTOCOL_VERSION,
        command: Command::Add,
        pod_namespace: "shop".into(),
        pod_name: "web".into(),
        container_id: "c".into(),
        netns: "/run/netns/x".into(),
        ips: vec![],
        timeout_ms: 1000,
    };
    let reply = SocketLink.call(&socket, &req, Duration::from_secs(5));
    assert_eq!(reply, Ok(Reply::Enrolled { netns_cookie: 9 }));
    assert_eq!(server.join().expect("server"), req);
    let _ = std::fs::remove_file(&socket);
    match SocketLink.call(&socket, &req, Duration::from_secs(1)) {
        Err(CallError::Unreachable(why)) => assert!(why.contains("cni.sock"), "{why}"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(socket.parent().expect("dir"));
}
