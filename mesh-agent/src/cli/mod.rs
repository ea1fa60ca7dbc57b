//! Inspection commands: they talk to a running agent over its admin unix socket.

pub mod certs;
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

/// Left-aligned columns separated by two spaces, trailing blanks trimmed: the layout of
/// `kubectl get`.
pub fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
