//! Configuration: sources (a manifests directory in local mode) turned into one validated,
//! immutable [`model::Snapshot`], swapped atomically.

pub mod manifests;
pub mod model;
pub mod watch;
