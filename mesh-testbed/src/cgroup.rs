//! cgroup v2: finding the unified mount, creating and removing the testbed's cgroups.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Finds the mount point of the cgroup v2 (unified) hierarchy by parsing
/// `/proc/self/mountinfo` (works for the pure v2 layout at /sys/fs/cgroup as well as the hybrid
/// layout at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_cgroup2_mount(&text).ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted"))
}

pub(crate) fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut best: Option<PathBuf> = None;
    for line in mountinfo.lines() {
        // <id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ...
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        let mount_point = PathBuf::from(unescape_mountinfo(fields[4]));
        // Prefer a mount of the hierarchy's root.
        if fields[3] == "/" {
            return Some(mount_point);
        }
        best.get_or_insert(mount_point);
    }
    best
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a cgroup directory (parents must exist). An existing directory is an error: the
/// testbed only ever removes cgroups it created itself.
pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// Pids currently in a cgroup (not its descendants).
pub fn procs(path: &Path) -> Result<Vec<i32>> {
    let file = path.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether a cgroup or any of its descendants still has processes.
pub fn populated(path: &Path) -> bool {
    match std::fs::read_to_string(path.join("cgroup.events")) {
        Ok(text) => text.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => procs(path).map(|p| !p.is_empty()).unwrap_or(false),
    }
}

/// Kills every process in the cgroup subtree rooted at `path` (these are all processes the
/// testbed placed there itself: agents and commands started with `pod_command`). Uses
/// `cgroup.kill` where the kernel has it, else SIGKILLs each listed pid.
pub fn kill_all(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill_file = path.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1")
            .with_context(|| format!("writing 1 to {}", kill_file.display()))?;
        return Ok(());
    }
    for dir in subtree_leaf_first(path) {
        for pid in procs(&dir).unwrap_or_default() {
            // SAFETY: plain kill(2) on a pid read from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// All directories of a cgroup subtree, deepest first, ending with `path` itself.
pub fn subtree_leaf_first(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    collect_leaf_first(path, &mut out);
    out
}

fn collect_leaf_first(path: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(path) {
        let mut children: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
        children.sort();
        for c in children {
            collect_leaf_first(&c, out);
        }
    }
    if path.is_dir() {
        out.push(path.to_path_buf());
    }
}

/// Removes a whole cgroup subtree: kills its processes, waits (bounded) until it is empty and
/// removes the directories leaf-first, retrying briefly while the kernel finishes exiting
/// the killed tasks.
pub fn remove_tree(path: &Path, deadline: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    kill_all(path)?;
    let until = Instant::now() + deadline;
    while populated(path) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut last_err;
    loop {
        last_err = None;
        for dir in subtree_leaf_first(path) {
            if let Err(e) = std::fs::remove_dir(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                last_err = Some((dir, e));
            }
        }
        if last_err.is_none() || Instant::now() >= until {
            break;
        }
        // Processes forked after the kill (or still exiting): kill again and retry.
        let _ = kill_all(path);
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some((dir, e)) = last_err {
        let left = procs(&dir).unwrap_or_default();
        bail!(
            "removing cgroup {}: {e} (pids still inside: {left:?})",
            dir.display()
        );
    }
    Ok(())
}

/// The cgroup v2 path of a process relative to the unified mount (the `0::` line of
/// `/proc/<pid>/cgroup`).
pub fn of_pid(pid: u32) -> Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{file} has no cgroup v2 (0::) entry"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_unified_mount() {
        let mi = "25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_pure_v2_mount_with_optional_fields_and_escapes() {
        let mi = "35 24 0:30 / /sys/fs/cgroup\\040x rw,nosuid shared:9 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup x"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }
}
