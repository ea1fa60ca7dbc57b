//! Telemetry: Istio-compatible metrics (`metrics`), access logs (`access_log`), distributed
//! tracing (`trace`) and the agent's own health (`health`).

pub mod access_log;
pub mod health;
pub mod metrics;
pub mod trace;
