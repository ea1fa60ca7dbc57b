//! Inspection commands: they talk to a running agent over its admin unix socket, except
//! `analyze`, which checks YAML offline.

pub mod analyze;
pub mod certs;
pub mod client;
pub mod connections;
pub mod routes;
pub mod services;
pub mod status;
pub mod workloads;

/// `on` / `off` arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Output format of the inspection commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A human-readable table.
    #[default]
    Table,
    /// JSON, as the admin API returns it.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// Prints the admin API's JSON document in the structured formats (JSON as is, YAML
/// converted); returns false for [`Output::Table`], which each command renders itself.
pub fn print_structured(body: &str, output: Output) -> anyhow::Result<bool> {
    match output {
        Output::Table => Ok(false),
        Output::Json => {
            print!("{body}");
            Ok(true)
        }
        Output::Yaml => {
            let doc: serde_json::Value = serde_json::from_str(body)
                .map_err(|e| anyhow::anyhow!("the agent's answer is not valid JSON: {e}"))?;
            print!("{}", serde_yaml::to_string(&doc)?);
            Ok(true)
        }
    }
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
