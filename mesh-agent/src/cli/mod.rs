//! Inspection commands: they talk to a running agent over its admin unix socket.

pub mod client;
pub mod services;
pub mod status;
pub mod workloads;

/// Output format of the inspection commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A human-readable table.
    #[default]
    Table,
    /// JSON, as the admin API returns it.
    Json,
}
