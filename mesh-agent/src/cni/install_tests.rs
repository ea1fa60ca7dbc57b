//! Installing into a temporary bin and conf directory: chaining, idempotence, a single plugin
//! `.conf`, a rewritten conflist, uninstall.

use super::*;

struct Dirs {
    root: PathBuf,
    args: InstallArgs,
    source: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Dirs {
        let root =
            std::env::temp_dir().join(format!("nodemesh-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).expect("dirs");
        let source = root.join("mesh-agent");
        std::fs::write(&source, b"#!/bin/true\nversion 1\n").expect("source");
        Dirs {
            args: InstallArgs {
                bin_dir: root.join("bin"),
                conf_dir: root.join("net.d"),
                agent_socket: "/var/run/nodemesh/cni.sock".into(),
                timeout: "30s".into(),
                exclude_namespaces: vec!["kube-system".into(), "nodemesh-system".into()],
            },
            root,
            source,
        }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.args.conf_dir.join(name), text).expect("write conf");
    }

    fn read(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.args.conf_dir.join(name)).expect("read conf");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"))
    }

    fn types(&self, name: &str) -> Vec<String> {
        let doc = self.read(name);
        let plugins = doc["plugins"].as_array().cloned().unwrap_or_default();
        plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

#[test]
fn install_chains_into_the_first_conflist_once() {
    let d = Dirs::new("chain");
    d.write("10-flannel.conflist", FLANNEL);
    d.write(
        "99-other.conflist",
        r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
    );
    let done = install(&d.args, &d.source).expect("install");
    assert_eq!(done.conflist, d.args.conf_dir.join("10-flannel.conflist"));
    assert!(done.binary_written && done.conflist_written);
    let bin = d.args.bin_dir.join("nodemesh-cni");
    assert_eq!(
        std::fs::read(&bin).expect("bin"),
        std::fs::read(&d.source).expect("src")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&bin).expect("stat").permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        d.types("10-flannel.conflist"),
        ["flannel", "portmap", "nodemesh-cni"]
    );
    let doc = d.read("10-flannel.conflist");
    assert_eq!(
        (doc["name"].as_str(), doc["cniVersion"].as_str()),
        (Some("cbr0"), Some("1.0.0"))
    );
    assert_eq!(
        doc["plugins"][0]["delegate"]["hairpinMode"], true,
        "others kept as written"
    );
    let ours = &doc["plugins"][2];
    assert_eq!(ours["agentSocket"], "/var/run/nodemesh/cni.sock");
    assert_eq!(ours["timeout"], "30s");
    assert_eq!(
        ours["excludeNamespaces"],
        serde_json::json!(["kube-system", "nodemesh-system"])
    );
    // The entry parses as the plugin parses its config.
    let conf = crate::cni::conf::parse_conf(
        format!(
            r#"{{"cniVersion":"1.0.0","name":"cbr0",{}"#,
            &ours.to_string()[1..]
        )
        .as_bytes(),
    )
    .expect("the installed entry is a valid plugin config");
    assert_eq!(conf.exclude_namespaces.len(), 2);
    assert_eq!(
        d.types("99-other.conflist"),
        ["bridge"],
        "only the first is chained"
    );

    // Again: nothing changes, byte for byte.
    let before = std::fs::read(d.args.conf_dir.join("10-flannel.conflist")).expect("read");
    let again = install(&d.args, &d.source).expect("again");
    assert!(
        !again.binary_written && !again.conflist_written,
        "{again:?}"
    );
    assert_eq!(
        std::fs::read(d.args.conf_dir.join("10-flannel.conflist")).expect("read"),
        before
    );

    // Settings changed: the entry is replaced in place, not added twice.
    let mut changed = d.args.clone();
    changed.timeout = "10s".into();
    assert!(chain(&changed).expect("chain").1);
    assert_eq!(
        d.types("10-flannel.conflist"),
        ["flannel", "portmap", "nodemesh-cni"]
    );
    assert_eq!(
        d.read("10-flannel.conflist")["plugins"][2]["timeout"],
        "10s"
    );

    // The cluster's CNI rewrote its file without us: appended again. A new binary replaces
    // the old one.
    d.write("10-flannel.conflist", FLANNEL);
    std::fs::write(&d.source, b"#!/bin/true\nversion 2\n").expect("source");
    let done = install(&d.args, &d.source).expect("reinstall");
    assert!(done.binary_written && done.conflist_written);
    assert_eq!(
        d.types("10-flannel.conflist"),
        ["flannel", "portmap", "nodemesh-cni"]
    );

    // Uninstall takes out our entry and the binary, and is idempotent.
    let removed = uninstall(&d.args).expect("uninstall");
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert_eq!(d.types("10-flannel.conflist"), ["flannel", "portmap"]);
    assert!(!bin.exists());
    assert!(uninstall(&d.args).expect("again").is_empty());
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let d = Dirs::new("single");
    d.write(
        "10-bridge.conf",
        r#"{"cniVersion":"0.4.0","name":"mynet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}"#,
    );
    let done = install(&d.args, &d.source).expect("install");
    assert_eq!(done.conflist, d.args.conf_dir.join("10-bridge.conflist"));
    assert!(!d.args.conf_dir.join("10-bridge.conf").exists());
    let doc = d.read("10-bridge.conflist");
    assert_eq!(
        (doc["name"].as_str(), doc["cniVersion"].as_str()),
        (Some("mynet"), Some("0.4.0"))
    );
    assert_eq!(d.types("10-bridge.conflist"), ["bridge", "nodemesh-cni"]);
    assert_eq!(doc["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
    assert!(!install(&d.args, &d.source).expect("again").conflist_written);
}

#[test]
fn problems_name_the_directory_or_file() {
    let d = Dirs::new("bad");
    let e = install(&d.args, &d.source).expect_err("empty dir");
    assert!(format!("{e:#}").contains("no CNI network config"), "{e:#}");
    d.write("00-broken.conflist", "{ nope");
    d.write("10-fine.conflist", FLANNEL);
    let e = chain(&d.args).expect_err("broken first file");
    assert!(format!("{e:#}").contains("00-broken.conflist"), "{e:#}");
    d.write("00-broken.conflist", r#"{"cniVersion":"1.0.0","name":"x"}"#);
    let e = chain(&d.args).expect_err("neither");
    assert!(format!("{e:#}").contains("neither a conflist"), "{e:#}");
    d.write(
        "00-broken.conflist",
        r#"{"cniVersion":"1.0.0","plugins":[{"type":"nodemesh-cni"}]}"#,
    );
    let e = chain(&d.args).expect_err("ours alone");
    assert!(format!("{e:#}").contains("no plugin besides"), "{e:#}");
    let mut bad = d.args.clone();
    bad.exclude_namespaces = vec!["Kube_System".into()];
    let e = install(&bad, &d.source).expect_err("bad namespace");
    assert!(format!("{e:#}").contains("--exclude-namespace"), "{e:#}");
}
