//! Configuration: sources (a manifests directory in local mode, the API server's watchers in
//! Kubernetes mode) turned into one validated, immutable [`model::Snapshot`], swapped
//! atomically. Both sources share [`convert`]; only where objects come from differs.

pub mod authz;
pub mod convert;
pub mod gateway;
pub mod kube;
pub mod manifests;
pub mod model;
pub mod routing;
pub mod watch;
