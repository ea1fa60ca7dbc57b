//! The scanner on a fake `/proc`: a temp dir with `<pid>/ns/net` links to `net:[<inode>]`
//! (dangling, as in a real `/proc` seen from outside), `<pid>/net/fib_trie`, `<pid>/cgroup`
//! and `<pid>/stat`, written the way the kernel writes them.

use std::collections::HashSet;
use std::os::unix::fs::{PermissionsExt, symlink};

use super::*;

const HOST_NS: u64 = 4026531840;
const UID: &str = "0f5c4a7e-2b1d-4c3e-9a8b-7d6e5f4a3b2c";
const OTHER_UID: &str = "11111111-2222-3333-4444-555555555555";

struct FakeProc {
    dir: PathBuf,
}

impl FakeProc {
    fn new(tag: &str) -> FakeProc {
        let dir =
            std::env::temp_dir().join(format!("nodemesh-fakeproc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fake proc");
        let fake = FakeProc { dir };
        // The agent itself (pid 100, `self`) and init, in the node's namespace.
        fake.process(1, HOST_NS, &["192.168.1.10"], "/init.scope", 1);
        fake.process(100, HOST_NS, &["192.168.1.10"], "/system.slice/agent", 5000);
        symlink("100", fake.dir.join("self")).expect("self");
        fake
    }

    fn root(&self) -> ProcRoot {
        ProcRoot::new(&self.dir)
    }

    /// A process in namespace `ino` whose namespace has `ips`, in `cgroup`, started at `start`.
    fn process(&self, pid: u32, ino: u64, ips: &[&str], cgroup: &str, start: u64) {
        let d = self.dir.join(pid.to_string());
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ns")).expect("ns dir");
        std::fs::create_dir_all(d.join("net")).expect("net dir");
        symlink(format!("net:[{ino}]"), d.join("ns/net")).expect("ns link");
        std::fs::write(d.join("net/fib_trie"), fib_trie(ips)).expect("fib_trie");
        std::fs::write(d.join("cgroup"), format!("1:name=systemd:/\n0::{cgroup}\n"))
            .expect("cgroup");
        let stat = format!(
            "{pid} (some (odd) name) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 200"
        );
        std::fs::write(d.join("stat"), stat).expect("stat");
    }

    fn scan(&self, wanted: &[Wanted]) -> ScanReport {
        self.root()
            .scan(wanted, &Scope::All, &HashSet::new())
            .expect("scan")
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `fib_trie` as the kernel prints it for a namespace with `lo` and these addresses on /24s.
fn fib_trie(ips: &[&str]) -> String {
    let mut out = String::from("Main:\n  +-- 0.0.0.0/0 3 0 5\n");
    for section in ["Main", "Local"] {
        if section == "Local" {
            out.push_str("Local:\n  +-- 0.0.0.0/0 3 0 5\n");
        }
        out.push_str("     |-- 127.0.0.0\n        /8 host LOCAL\n");
        out.push_str("     |-- 127.0.0.1\n        /32 host LOCAL\n");
        for ip in ips {
            let net = ip.rsplit_once('.').map_or("", |(n, _)| n);
            out.push_str(&format!("     |-- {net}.0\n        /24 link UNICAST\n"));
            out.push_str(&format!("     |-- {ip}\n        /32 host LOCAL\n"));
            out.push_str(&format!("     |-- {net}.255\n        /32 link BROADCAST\n"));
        }
    }
    out
}

fn wanted(name: &str, ip: &str, uid: Option<&str>) -> Wanted {
    Wanted {
        id: ObjectRef {
            namespace: "shop".into(),
            name: name.into(),
        },
        ip: ip.parse().expect("ip"),
        uid: uid.map(str::to_owned),
    }
}

fn id(name: &str) -> ObjectRef {
    wanted(name, "0.0.0.0", None).id
}

#[test]
fn matches_by_ip_and_picks_the_oldest_process() {
    let fake = FakeProc::new("ip");
    // An app process started after the sandbox's; a second pod elsewhere.
    fake.process(300, 4026532300, &["10.244.1.5"], "/testbed/web", 900);
    fake.process(200, 4026532300, &["10.244.1.5"], "/testbed/web", 400);
    fake.process(400, 4026532400, &["10.244.1.6"], "/testbed/db", 500);
    let report = fake.scan(&[wanted("web", "10.244.1.5", None)]);
    let found = report.found.get(&id("web")).expect("web found");
    assert_eq!(found.netns_ino, 4026532300);
    assert_eq!(found.pid, 200, "the oldest process of the namespace");
    assert_eq!(found.path, fake.dir.join("200/ns/net"));
    assert_eq!(found.by, MatchedBy::Ip);
    assert_eq!(found.sandbox_id, None);
    assert!(report.missed.is_empty());
}

#[test]
fn confirms_with_the_pod_uid_in_the_cgroup_and_refuses_another_pods() {
    let fake = FakeProc::new("uid");
    let sandbox = "a".repeat(64);
    // systemd driver: the UID with underscores in the slice name, the sandbox in a scope.
    let systemd = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{sandbox}.scope",
        UID.replace('-', "_")
    );
    fake.process(200, 4026532300, &["10.244.1.5"], &systemd, 400);
    // cgroupfs driver, another pod that (stale) has the same IP.
    let cgroupfs = format!("/kubepods/besteffort/pod{OTHER_UID}/{}", "b".repeat(64));
    fake.process(500, 4026532500, &["10.244.1.5"], &cgroupfs, 300);
    let report = fake.scan(&[wanted("web", "10.244.1.5", Some(UID))]);
    let found = report.found.get(&id("web")).expect("web found");
    assert_eq!(
        (found.netns_ino, found.by),
        (4026532300, MatchedBy::IpAndCgroup)
    );
    assert_eq!(found.sandbox_id.as_deref(), Some(sandbox.as_str()));

    // A pod whose UID neither cgroup names: both namespaces are other pods', never taken.
    let stranger = "99999999-2222-3333-4444-555555555555";
    let report = fake.scan(&[wanted("api", "10.244.1.5", Some(stranger))]);
    let why = &report.missed[&id("api")];
    assert!(why.contains("belongs to another pod"), "{why}");
    let fake2 = FakeProc::new("uid2");
    fake2.process(500, 4026532500, &["10.244.1.5"], &cgroupfs, 300);
    let report = fake2.scan(&[wanted("web", "10.244.1.5", Some(UID))]);
    let why = report.missed.get(&id("web")).expect("web missed");
    assert!(
        why.contains("belongs to another pod") && why.contains(OTHER_UID),
        "{why}"
    );
}

#[test]
fn the_nodes_own_namespace_is_never_a_pod() {
    let fake = FakeProc::new("host");
    // The pod IP asked for is the node's (a hostNetwork-like mistake): not found.
    let report = fake.scan(&[wanted("web", "192.168.1.10", None)]);
    assert!(report.found.is_empty());
    assert!(report.missed[&id("web")].contains("no process's network namespace has IP"));
    assert_eq!((report.processes, report.namespaces), (0, 0));
    // pid 1 in another namespace than the agent (agent without hostPID): both skipped.
    fake.process(1, 4026531999, &["192.168.1.11"], "/", 1);
    let report = fake.scan(&[wanted("web", "192.168.1.11", None)]);
    assert!(report.found.is_empty());
}

#[test]
fn many_processes_of_one_namespace_are_read_once() {
    let fake = FakeProc::new("dedupe");
    for pid in 200..260 {
        fake.process(
            pid,
            4026532300,
            &["10.244.1.5"],
            "/testbed/web",
            u64::from(pid),
        );
    }
    let report = fake.scan(&[
        wanted("web", "10.244.1.5", None),
        wanted("db", "10.244.1.6", None),
    ]);
    assert_eq!((report.processes, report.namespaces), (60, 1));
    assert_eq!(report.found[&id("web")].pid, 200);
    assert!(report.missed.contains_key(&id("db")));
    // A namespace already some pod's sandbox is not offered again.
    let taken = HashSet::from([4026532300]);
    let report = fake
        .root()
        .scan(&[wanted("web", "10.244.1.5", None)], &Scope::All, &taken)
        .expect("scan");
    assert!(report.found.is_empty());
}

#[test]
fn unreadable_and_vanished_processes_are_skipped() {
    let fake = FakeProc::new("unreadable");
    fake.process(200, 4026532300, &["10.244.1.5"], "/testbed/web", 400);
    // Gone between the listing and the read: no ns link.
    std::fs::create_dir_all(fake.dir.join("250")).expect("dir");
    // A link that is not a network namespace's.
    std::fs::create_dir_all(fake.dir.join("260/ns")).expect("dir");
    symlink("mnt:[1]", fake.dir.join("260/ns/net")).expect("link");
    // Its fib_trie unreadable (the first process): the next process of the namespace serves.
    fake.process(150, 4026532300, &["10.244.1.5"], "/testbed/web", 100);
    std::fs::remove_file(fake.dir.join("150/net/fib_trie")).expect("rm");
    // Not processes.
    std::fs::create_dir_all(fake.dir.join("sys")).expect("dir");
    std::fs::write(fake.dir.join("uptime"), "1 1").expect("file");
    let report = fake.scan(&[wanted("web", "10.244.1.5", None)]);
    assert_eq!(report.unreadable, 2);
    assert_eq!(report.found[&id("web")].pid, 150, "still the oldest");
    // A directory the agent may not list at all is an error naming it.
    if unsafe_is_root() {
        return; // root reads through mode 000
    }
    let locked = FakeProc::new("locked");
    std::fs::set_permissions(&locked.dir, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let err = locked.root().scan(&[], &Scope::All, &HashSet::new());
    std::fs::set_permissions(&locked.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(err.is_err());
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn no_match_says_why() {
    let fake = FakeProc::new("nomatch");
    fake.process(200, 4026532300, &["10.244.1.5"], "/testbed/web", 400);
    fake.process(300, 4026532301, &["10.244.1.5"], "/testbed/web2", 400);
    let report = fake.scan(&[
        wanted("web", "10.244.1.5", None),
        wanted("gone", "10.244.1.9", Some(UID)),
    ]);
    assert!(report.found.is_empty());
    let ambiguous = &report.missed[&id("web")];
    assert!(
        ambiguous.contains("2 network namespaces have IP 10.244.1.5"),
        "{ambiguous}"
    );
    let none = &report.missed[&id("gone")];
    assert!(
        none.contains("no process's network namespace has IP 10.244.1.9"),
        "{none}"
    );
    // Not a /proc at all.
    let empty = std::env::temp_dir().join(format!("nodemesh-noproc-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("dir");
    let err = ProcRoot::new(&empty)
        .scan(&[], &Scope::All, &HashSet::new())
        .expect_err("no self");
    assert!(err.to_string().contains("hostPID"), "{err}");
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn scope_keeps_to_the_capture_cgroup() {
    let fake = FakeProc::new("scope");
    fake.process(200, 4026532300, &["10.244.1.5"], "/mesh-test/pods/web", 400);
    fake.process(
        300,
        4026532301,
        &["10.244.1.5"],
        "/mesh-testbed-other/web",
        300,
    );
    let scope = Scope::Under("/mesh-test".into());
    let report = fake
        .root()
        .scan(
            &[wanted("web", "10.244.1.5", None)],
            &scope,
            &HashSet::new(),
        )
        .expect("scan");
    assert_eq!(report.found[&id("web")].netns_ino, 4026532300);
    assert!(!Scope::Under("/a/b".into()).contains(Some("/a/bc")));
    assert!(Scope::Under("/a/b".into()).contains(Some("/a/b")));
    assert!(!Scope::Under("/a".into()).contains(None));

    // From mountinfo: a subtree of a cgroup2 mount, the hierarchy root, a foreign root.
    let dir = std::env::temp_dir().join(format!("nodemesh-scope-{}", std::process::id()));
    let sub = dir.join("sub/test");
    std::fs::create_dir_all(&sub).expect("dir");
    std::fs::write(sub.join("cgroup.type"), "domain\n").expect("type");
    let mountinfo = format!(
        "30 1 0:25 / {} rw - cgroup2 cgroup2 rw\n31 1 0:26 / /proc rw - proc proc rw\n",
        dir.display()
    );
    assert_eq!(
        Scope::of_cgroup(&sub, &mountinfo),
        Scope::Under("/sub/test".into())
    );
    assert_eq!(
        Scope::of_cgroup(&dir, &mountinfo),
        Scope::All,
        "no cgroup.type: the root"
    );
    let foreign = format!(
        "30 1 0:25 /../.. {} rw - cgroup2 cgroup2 rw\n",
        dir.display()
    );
    assert_eq!(Scope::of_cgroup(&sub, &foreign), Scope::All);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parsers() {
    assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
    assert_eq!(parse_ns_link("mnt:[4026531840]"), None);
    let ips = local_ipv4s(&fib_trie(&["10.244.1.5", "10.0.0.7"]));
    assert_eq!(
        ips.into_iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        ["10.0.0.7", "10.244.1.5"],
        "local addresses only, not networks, broadcasts or loopback"
    );
    assert_eq!(
        pod_uid(&format!("/kubepods/burstable/pod{UID}/abc")),
        Some(UID.into())
    );
    assert_eq!(
        pod_uid(&format!("/system.slice/pod{UID}")),
        None,
        "not a kubelet cgroup"
    );
    assert_eq!(pod_uid("/kubepods/podnotauid/x"), None);
    let id = "c".repeat(64);
    for path in [
        format!("/kubepods/x/crio-{id}.scope"),
        format!("/kubepods/x/docker-{id}.scope"),
        format!("/kubepods/x/{id}"),
    ] {
        assert_eq!(container_id(&path).as_deref(), Some(id.as_str()), "{path}");
    }
    assert_eq!(container_id("/kubepods/x/short"), None);
    assert_eq!(cgroup_v2_path("1:cpu:/x\n0::/a/b\n"), Some("/a/b"));
    assert_eq!(
        stat_start_time("7 (a) b) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1234 1 1"),
        Some(1234)
    );
}
