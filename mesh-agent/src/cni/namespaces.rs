//! The agent's last word on which namespaces are enrolled, left on the host for the plugin to
//! read when the agent cannot be reached (the fail-closed rule in [`super`]).
//!
//! The agent rewrites it (atomically) whenever the set of namespaces or their labels change,
//! once its config is complete (Kubernetes mode: after the first full sync). It lists every
//! namespace the agent knew, enrolled or not, so a namespace created since is "unknown", not
//! "not enrolled".

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::model::Snapshot;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceCache {
    pub version: u32,
    /// The node the agent runs for.
    pub node: String,
    /// When the agent wrote it (RFC 3339).
    pub written: String,
    /// Every namespace the agent knew, and whether it is enrolled.
    pub namespaces: BTreeMap<String, bool>,
}

/// What the cache says about one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    Enrolled,
    NotEnrolled,
    Unknown,
}

impl NamespaceCache {
    pub fn from_snapshot(node: &str, snap: &Snapshot) -> NamespaceCache {
        NamespaceCache {
            version: 1,
            node: node.to_owned(),
            written: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            namespaces: snap
                .namespaces
                .values()
                .map(|n| (n.name.clone(), n.enrolled()))
                .collect(),
        }
    }

    pub fn lookup(&self, namespace: &str) -> Known {
        match self.namespaces.get(namespace) {
            Some(true) => Known::Enrolled,
            Some(false) => Known::NotEnrolled,
            None => Known::Unknown,
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        // Readable by anyone on the host: namespace names and labels are not secrets.
        super::write_atomic(path, &text, 0o644)
    }

    /// The cache at `path`; the error names the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<NamespaceCache, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() > 4 << 20 {
            return Err(format!("{}: larger than 4 MiB", path.display()));
        }
        let cache: NamespaceCache =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if cache.version != 1 {
            return Err(format!(
                "{}: version {} (this plugin reads 1)",
                path.display(),
                cache.version
            ));
        }
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::Namespace;

    #[test]
    fn lists_every_namespace_and_reads_back() {
        let mut snap = Snapshot::default();
        for (name, on) in [("shop", true), ("kube-system", false)] {
            let labels = if on {
                [(
                    crate::config::model::ENROLL_LABEL.to_owned(),
                    "true".to_owned(),
                )]
                .into()
            } else {
                BTreeMap::new()
            };
            snap.namespaces.insert(
                name.into(),
                Namespace {
                    name: name.into(),
                    labels,
                },
            );
        }
        let cache = NamespaceCache::from_snapshot("node-1", &snap);
        assert_eq!(cache.lookup("shop"), Known::Enrolled);
        assert_eq!(cache.lookup("kube-system"), Known::NotEnrolled);
        assert_eq!(cache.lookup("new"), Known::Unknown);
        let dir = std::env::temp_dir().join(format!("nodemesh-nscache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cni-namespaces.json");
        cache.save(&path).expect("save");
        assert_eq!(NamespaceCache::read(&path), Ok(cache));
        std::fs::write(&path, "{\"version\": 2}").expect("write");
        let e = NamespaceCache::read(&path).expect_err("bad");
        assert!(e.contains("cni-namespaces.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
