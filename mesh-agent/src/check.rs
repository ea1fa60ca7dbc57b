//! `mesh-agent check`: every kernel prerequisite of the agent, ok or missing with a hint.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub hint: Option<String>,
}

fn check(name: &str, ok: bool, detail: impl Into<String>, hint: &str) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail: detail.into(),
        hint: (!ok).then(|| hint.to_string()),
    }
}

/// The capabilities the agent needs (bit, name): CAP_BPF to load programs and make maps,
/// CAP_NET_ADMIN for cgroup/tc attachment, SO_MARK, IP_TRANSPARENT and the routing rules in
/// pods' namespaces, CAP_SYS_ADMIN for setns into them and for mounting bpffs, CAP_SYS_PTRACE
/// to open other users' `/proc/<pid>/ns/net` (finding pods that predate the agent, and
/// runtimes that name a sandbox by `/proc/<pid>/ns/net`). deploy/'s DaemonSet grants exactly
/// these (checked by `deploy_tests`).
pub const REQUIRED_CAPS: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
];

pub fn run_checks() -> Vec<Check> {
    let mut out = Vec::new();

    let caps = crate::sys::effective_caps().unwrap_or(0);
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    out.push(check(
        "privileges",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE".to_string()
        } else {
            format!("missing {}", missing.join(", "))
        },
        "run as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN (setns, bpffs) and \
         CAP_SYS_PTRACE (other processes' /proc/<pid>/ns/net)",
    ));

    let cg = crate::sys::cgroup2_mount();
    out.push(check(
        "cgroup2 mount",
        cg.is_some(),
        cg.as_ref().map_or("not mounted".to_string(), |p| {
            format!("mounted at {}", p.display())
        }),
        "mount a cgroup v2 hierarchy: mount -t cgroup2 none /sys/fs/cgroup/unified",
    ));

    let bpffs = Path::new("/sys/fs/bpf");
    let mounted = crate::capture::is_bpffs(bpffs);
    out.push(check(
        "bpffs",
        mounted,
        if mounted {
            "mounted at /sys/fs/bpf".to_string()
        } else {
            "not mounted at /sys/fs/bpf".to_string()
        },
        "mount -t bpf bpf /sys/fs/bpf (the agent mounts it itself when privileged)",
    ));

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(check(
        "BTF",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "/sys/kernel/btf/vmlinux missing"
        },
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    ));

    for (ty, name) in [
        (ProgramType::CgroupSockAddr, "program type cgroup_sock_addr"),
        (ProgramType::SockOps, "program type sock_ops"),
    ] {
        let r = aya::sys::is_program_supported(ty);
        out.push(check(
            name,
            matches!(r, Ok(true)),
            match &r {
                Ok(true) => "supported".to_string(),
                Ok(false) => "not supported by this kernel".to_string(),
                Err(e) => format!("probe failed: {e}"),
            },
            "needs Linux >= 5.10 with CONFIG_CGROUP_BPF=y and privileges to load BPF",
        ));
    }
    for (ty, name) in [
        (MapType::Hash, "map type hash"),
        (MapType::LruHash, "map type lru_hash"),
        (MapType::PerCpuArray, "map type percpu_array"),
    ] {
        let r = aya::sys::is_map_supported(ty);
        out.push(check(
            name,
            matches!(r, Ok(true)),
            match &r {
                Ok(true) => "supported".to_string(),
                Ok(false) => "not supported by this kernel".to_string(),
                Err(e) => format!("probe failed: {e}"),
            },
            "needs Linux >= 5.10 and privileges to create BPF maps",
        ));
    }

    let cookie = crate::capture::netns::agent_socket(socket2::Domain::IPV4)
        .and_then(|s| crate::capture::netns::netns_cookie(&s));
    out.push(check(
        "SO_NETNS_COOKIE",
        cookie.is_ok(),
        match &cookie {
            Ok(c) => format!("works (this namespace: {c})"),
            Err(e) => format!("failed: {e}"),
        },
        "needs Linux >= 5.14 (SO_NETNS_COOKIE) and CAP_NET_ADMIN for SO_MARK",
    ));

    let verified = crate::capture::verify_programs();
    out.push(check(
        "eBPF programs load",
        verified.is_ok(),
        match &verified {
            Ok(()) => "connect4/6, getpeername4/6, sock_ops accepted by the verifier".to_string(),
            Err(e) => format!("{e}"),
        },
        "see the verifier message; the kernel may lack a helper the programs use",
    ));

    // Optional: the mesh works without the fast path, so this never fails the check; it
    // says what `--fast-path=on` would do on this kernel, and why.
    let fast_path = crate::capture::check_fast_path(crate::capture::fast_path::DEFAULT_BUDGET);
    out.push(check(
        "fast path self-test (optional)",
        true,
        match &fast_path {
            Ok(r) => format!(
                "passes ({} messages redirected, {} bytes checked): --fast-path=on would turn it on",
                r.redirected, r.bytes
            ),
            Err(crate::capture::fast_path::FastPathCheckError::SelfTest(
                e @ crate::capture::fast_path::SelfTestError::BlockingReadEagain { .. },
            )) => format!(
                "data checks pass but {e}; --fast-path=on keeps it off, --fast-path=force would turn it on"
            ),
            Err(e) => format!("fails: {e}; the agent keeps the fast path off"),
        },
        "",
    ));
    out
}

/// Prints the checks; returns false if any failed.
pub fn print(checks: &[Check], json: bool) -> bool {
    let ok = checks.iter().all(|c| c.ok);
    if json {
        match serde_json::to_string_pretty(checks) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("encoding: {e}"),
        }
        return ok;
    }
    for c in checks {
        let state = if c.ok { "ok" } else { "MISSING" };
        println!("{state:<8} {:<32} {}", c.name, c.detail);
        if let Some(h) = &c.hint {
            println!("{:<8} {:<32} hint: {h}", "", "");
        }
    }
    if ok {
        println!("all prerequisites present");
    } else {
        println!("some prerequisites are missing");
    }
    ok
}
