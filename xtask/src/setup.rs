//! `cargo xtask setup`: make a fresh machine ready to build and test nodemesh.
//!
//! Idempotent and quick when everything is present. Steps: nightly rust-src, bpf-linker built
//! against the nightly's own libLLVM, Debian packages used by tests/benchmarks/demo, kubectl
//! (for rendering deploy/'s profiles; Debian's kubernetes-client when none is there), bpffs and
//! cgroup2 mounts, and a final check that the eBPF toolchain runs.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::{env, fs};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// `make` builds jemalloc (the agent's allocator, tikv-jemalloc-sys); the rest are the tests'
/// and the benchmark's peers and tools.
const APT_PACKAGES: &str = "make curl openssl iproute2 iperf3 wrk nghttp2-client tshark prometheus procps psmisc ethtool \
     nginx containernetworking-plugins";

#[derive(clap::Args, Debug, Default, Clone)]
pub struct SetupArgs {
    /// Do not install missing Debian packages (only report them).
    #[arg(long)]
    pub skip_apt: bool,
    /// Rebuild bpf-linker even if the installed one works.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &SetupArgs) -> Result<()> {
    let started = std::time::Instant::now();
    rust_src().context("setup step rust-src")?;
    bpf_linker(args.force).context("setup step bpf-linker")?;
    apt_packages(args.skip_apt).context("setup step apt packages")?;
    kubectl(args.skip_apt).context("setup step kubectl")?;
    bpffs().context("setup step bpffs")?;
    cgroup2().context("setup step cgroup2")?;
    final_check().context("setup step toolchain check")?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn report(step: &str, what: &str) {
    println!("setup: {step}: {what}");
}

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn need_root(step: &str, todo: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    report(step, &format!("needs root: {todo}"));
    bail!("{step} needs root to {todo}; re-run `cargo xtask setup` as root (e.g. with sudo)")
}

/// Shell-like rendering of a command, including explicitly set environment variables.
fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// A command from a whitespace-separated line (no quoting needed for our fixed commands).
fn cmd(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or_default());
    cmd.args(words);
    cmd
}

/// Runs a command capturing its output; only fails if it cannot be started.
fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// Runs a command capturing its output; fails (showing the command and its stderr) unless it
/// succeeds. Returns stdout.
fn check(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a long command with its output on the terminal; fails unless it succeeds.
fn stream(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status}); its output is above", describe(cmd));
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = check(&mut cmd(
        "rustup component list --toolchain nightly --installed",
    ))?;
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        report("rust-src", "ok (already present)");
        return Ok(());
    }
    stream(&mut cmd(
        "rustup component add rust-src --toolchain nightly",
    ))?;
    report("rust-src", "installed for the nightly toolchain");
    Ok(())
}

/// The toolchain's `llvm-profdata` (rustup's `llvm-tools` component, added if missing), for
/// `cargo xtask pgo`. Not a step of `setup` itself: nothing else needs it.
pub fn llvm_profdata(sysroot: &Path, host: &str) -> Result<PathBuf> {
    let path = sysroot
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if path.is_file() {
        report("llvm-tools", "ok (already present)");
        return Ok(path);
    }
    stream(&mut cmd("rustup component add llvm-tools"))?;
    if !path.is_file() {
        bail!(
            "`rustup component add llvm-tools` ran but {} is still missing",
            path.display()
        );
    }
    report("llvm-tools", "installed");
    Ok(path)
}

/// `bpf-linker --version` run directly (not via rustup/cargo), so a missing rpath shows up.
fn bpf_linker_works() -> bool {
    capture(cmd("bpf-linker --version").env_remove("LD_LIBRARY_PATH"))
        .is_ok_and(|o| o.status.success())
}

fn bpf_linker(force: bool) -> Result<()> {
    if !force && bpf_linker_works() {
        report("bpf-linker", "ok (already present)");
        return Ok(());
    }
    let vv = check(&mut cmd("rustc +nightly -vV"))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.trim().split('.').next())
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("no `LLVM version: N.x` line in `rustc +nightly -vV`:\n{vv}"))?
        .to_owned();
    let sysroot = check(&mut cmd("rustc +nightly --print sysroot"))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let real = real_libllvm(&sysroot_lib, &major)?;

    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    let prefix = cache.join("nodemesh").join(format!("llvm-{major}"));
    let link = prefix.join("lib").join("libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    if fs::read_link(&link).ok().as_deref() != Some(real.as_path()) {
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), real.display()))?;
    }

    report(
        "bpf-linker",
        &format!(
            "building {BPF_LINKER_VERSION} against {} (takes a minute or two)",
            real.display()
        ),
    );
    let mut install = cmd(&format!(
        "cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --force \
         --no-default-features --features llvm-{major}"
    ));
    install
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display()),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        // Build with the default toolchain even under `cargo +nightly xtask`.
        .env_remove("RUSTUP_TOOLCHAIN")
        // Away from the workspace so its .cargo/config.toml cannot affect the install.
        .current_dir(&cache);
    stream(&mut install)?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails (is ~/.cargo/bin on PATH?)"
        );
    }
    report(
        "bpf-linker",
        &format!("installed {BPF_LINKER_VERSION} (LLVM {major})"),
    );
    Ok(())
}

/// The real libLLVM shared object of the nightly: `libLLVM.so.<major>*`, or whatever the
/// `libLLVM-<major>-*.so` linker script's INPUT names.
fn real_libllvm(lib: &Path, major: &str) -> Result<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let so = format!("libLLVM.so.{major}");
    let real = names.iter().find(|n| {
        n.strip_prefix(&so)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if let Some(name) = real {
        return Ok(lib.join(name));
    }
    let script_prefix = format!("libLLVM-{major}-");
    let script = names
        .iter()
        .find(|n| n.starts_with(&script_prefix) && n.ends_with(".so"))
        .map(|n| lib.join(n))
        .with_context(|| format!("no libLLVM for LLVM {major} in {}", lib.display()))?;
    let bytes = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    if bytes.starts_with(b"\x7fELF") {
        return Ok(script);
    }
    let text = String::from_utf8_lossy(&bytes);
    let input = text
        .split_once("INPUT(")
        .and_then(|(_, rest)| rest.split(')').next())
        .and_then(|inner| inner.split_whitespace().next())
        .with_context(|| {
            format!(
                "{} is neither ELF nor an INPUT() linker script",
                script.display()
            )
        })?;
    Ok(lib.join(input))
}

fn apt_packages(skip: bool) -> Result<()> {
    let step = "apt packages";
    // Unknown packages make dpkg-query exit non-zero, so only the printed lines count.
    let query = format!("dpkg-query -W -f=${{Package}}:${{Status}}\\n {APT_PACKAGES}");
    let out = capture(&mut cmd(&query))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_suffix(":install ok installed"))
        .collect();
    let missing: Vec<&str> = APT_PACKAGES
        .split_whitespace()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        report(step, "ok (already present)");
        return Ok(());
    }
    let list = missing.join(" ");
    if skip {
        report(step, &format!("skipped (--skip-apt); missing: {list}"));
        return Ok(());
    }
    apt_install(step, &list)
}

/// `apt-get update` and `apt-get install` of `list` (space-separated), as root.
fn apt_install(step: &str, list: &str) -> Result<()> {
    need_root(step, &format!("apt-get install {list}"))?;
    report(step, &format!("installing {list}"));
    // Keep package maintainer scripts from starting daemons (e.g. prometheus) via invoke-rc.d.
    let _guard = PolicyRcGuard::install()?;
    let frontend = ("DEBIAN_FRONTEND", "noninteractive");
    stream(cmd("apt-get -q update").env(frontend.0, frontend.1))?;
    let install = format!(
        "apt-get -q install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
         -o Dpkg::Options::=--force-confold {list}"
    );
    stream(cmd(&install).env(frontend.0, frontend.1))?;
    report(step, &format!("installed {list}"));
    Ok(())
}

/// The first `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// kubectl renders deploy/'s profiles in the tests (`kubectl kustomize`). Any kubectl will
/// do; when there is none, Debian's kubernetes-client (kubectl 1.20, with the kustomize the
/// profiles are written for).
fn kubectl(skip: bool) -> Result<()> {
    let step = "kubectl";
    if let Some(path) = on_path("kubectl") {
        report(step, &format!("ok (already present: {})", path.display()));
        return Ok(());
    }
    if skip {
        report(
            step,
            "skipped (--skip-apt); missing: kubectl (kubernetes-client)",
        );
        return Ok(());
    }
    apt_install(step, "kubernetes-client")?;
    check(&mut cmd("kubectl version --client"))?;
    Ok(())
}

/// A temporary `/usr/sbin/policy-rc.d` that denies service starts; removed on drop if we made it.
struct PolicyRcGuard(Option<&'static Path>);

impl PolicyRcGuard {
    fn install() -> Result<Self> {
        let path = Path::new("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self(None));
        }
        fs::write(
            path,
            "#!/bin/sh\n# nodemesh setup: no service starts during apt-get\nexit 101\n",
        )
        .and_then(|()| {
            fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        })
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// (mount point, fstype) pairs from /proc/self/mountinfo.
fn mounts() -> Result<Vec<(String, String)>> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?.replace("\\040", " ");
            Some((mount_point, post.split(' ').next()?.to_owned()))
        })
        .collect())
}

fn bpffs() -> Result<()> {
    let is_mounted = || -> Result<bool> {
        Ok(mounts()?
            .iter()
            .any(|(p, t)| p == "/sys/fs/bpf" && t == "bpf"))
    };
    if is_mounted()? {
        report("bpffs", "ok (already present)");
        return Ok(());
    }
    need_root("bpffs", "mount -t bpf bpf /sys/fs/bpf")?;
    fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    check(&mut cmd("mount -t bpf bpf /sys/fs/bpf"))?;
    if !is_mounted()? {
        bail!("`mount -t bpf bpf /sys/fs/bpf` succeeded but no bpf filesystem is mounted there");
    }
    report("bpffs", "mounted bpf filesystem at /sys/fs/bpf");
    Ok(())
}

fn cgroup2() -> Result<()> {
    let all = mounts()?;
    let mut paths: Vec<&str> = all
        .iter()
        .filter(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p.as_str())
        .collect();
    paths.sort_by_key(|p| (*p != "/sys/fs/cgroup", p.len()));
    match paths.first() {
        Some(path) => {
            report("cgroup2", &format!("ok (already present at {path})"));
            Ok(())
        }
        None => bail!(
            "no cgroup2 filesystem is mounted; the agent attaches its programs to a cgroup2 \
             hierarchy. Mount one (as root): `mount -t cgroup2 none /sys/fs/cgroup` (or \
             /sys/fs/cgroup/unified on hybrid systems), or boot with systemd.unified_cgroup_hierarchy=1"
        ),
    }
}

fn final_check() -> Result<()> {
    let via_rustup = check(&mut cmd("rustup run nightly bpf-linker --version"))?;
    check(cmd("bpf-linker --version").env_remove("LD_LIBRARY_PATH"))?;
    report("toolchain check", &format!("ok ({})", via_rustup.trim()));
    Ok(())
}
