//! `kubectl kustomize`, as a user renders a profile. kubectl 1.20 (Debian's
//! kubernetes-client, which `cargo xtask setup` installs when no kubectl is present) and
//! current kubectl both read deploy/'s kustomizations.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `$KUBECTL`, else `kubectl` on PATH.
fn find() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        return Some(PathBuf::from(k));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
}

/// kubectl, or `None` when the test must skip: not found and MESH_REQUIRE_PRIVILEGED unset.
/// With MESH_REQUIRE_PRIVILEGED=1 (CI), a missing kubectl fails the test.
pub fn kubectl_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(k) = find() {
        return Some(k);
    }
    let why = "kubectl not found (set KUBECTL, or run `cargo xtask setup`, which installs \
               Debian's kubernetes-client)";
    if std::env::var("MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {why}; MESH_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

/// The YAML `kubectl kustomize DIR` prints. Deprecation warnings (newer kubectl on the
/// fields kubectl 1.20 needs) are not errors.
pub fn render(kubectl: &Path, dir: &Path) -> Result<String, String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} kustomize: {e}", kubectl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} kustomize {}` failed ({}): {}",
            kubectl.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("kubectl printed no UTF-8: {e}"))
}
