//! Facts about the host the agent reads from /proc.

use std::path::PathBuf;

/// Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo. Hybrid layouts mount it
/// at /sys/fs/cgroup/unified, pure v2 at /sys/fs/cgroup: never assume either.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&info)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // <id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <sopts>
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        pre.split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape_mount(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
pub fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &s[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Effective capabilities of this process (bit n = capability n).
pub fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let info = "25 24 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:3 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        let info = "25 24 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        assert_eq!(cgroup2_mount_in(info), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
