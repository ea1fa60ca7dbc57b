//! Telemetry: Istio-compatible metrics (`metrics`) and the agent's own health (`health`).

pub mod health;
pub mod metrics;
