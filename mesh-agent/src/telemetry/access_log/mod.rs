//! Access logs as MeshConfig configures them (`accessLogFile`, `accessLogFormat`,
//! `accessLogEncoding`), in Envoy's format language, so existing Istio log pipelines parse
//! nodemesh's lines unchanged.
//!
//! The data path never formats or writes: when a connection ends it hands a [`TcpRecord`]
//! (a few words and `Arc`s) to a bounded queue with `try_send`. A dedicated thread formats and
//! writes. A full queue drops the entry and counts it: logging never slows or blocks traffic.

pub mod format;
mod render;
pub mod time;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::warn;

use self::format::{Format, FormatError};
use crate::telemetry::metrics::TcpLabels;

/// Istio's default TEXT format (`EnvoyTextLogFormat`).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON format (`EnvoyJSONLogFormatIstio`).
pub const ISTIO_JSON_FORMAT: [(&str, &str); 24] = [
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// Entries waiting for the writer at most; beyond, new entries are dropped and counted.
const QUEUE: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Encoding {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub enum LogFormat {
    Text(Format),
    /// Key and value format, in key order.
    Json(Vec<(String, Format)>),
}

/// The access log in force: where, how encoded, what format.
#[derive(Clone, Debug, Serialize)]
pub struct AccessLogConfig {
    pub file: String,
    pub encoding: Encoding,
    /// The format as configured; `None` means Istio's default for the encoding.
    pub format: Option<String>,
    #[serde(skip)]
    pub parsed: LogFormat,
}

/// What is wrong with MeshConfig's access log settings, and in which field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct AccessLogConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl AccessLogConfig {
    /// Validates MeshConfig's three fields. `Ok(None)` when `accessLogFile` is empty (access
    /// logs off, Istio's default); the format is validated even then.
    pub fn from_mesh_config(
        file: Option<&str>,
        format: Option<&str>,
        encoding: Option<&str>,
    ) -> Result<Option<AccessLogConfig>, AccessLogConfigError> {
        let err = |field, reason: String| AccessLogConfigError { field, reason };
        let encoding = match encoding.unwrap_or("TEXT") {
            "TEXT" | "" => Encoding::Text,
            "JSON" => Encoding::Json,
            other => {
                return Err(err(
                    "accessLogEncoding",
                    format!("{other:?} is not TEXT or JSON"),
                ));
            }
        };
        let format = format.filter(|f| !f.trim().is_empty());
        let at = |e: FormatError| err("accessLogFormat", e.to_string());
        let parsed = match (encoding, format) {
            (Encoding::Text, None) => {
                LogFormat::Text(Format::parse(ISTIO_TEXT_FORMAT).map_err(at)?)
            }
            (Encoding::Text, Some(f)) => {
                // Istio ends every entry with a newline.
                let mut text = f.to_string();
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                LogFormat::Text(Format::parse(&text).map_err(at)?)
            }
            (Encoding::Json, None) => LogFormat::Json(
                ISTIO_JSON_FORMAT
                    .iter()
                    .map(|(k, v)| Ok(((*k).to_string(), Format::parse(v).map_err(at)?)))
                    .collect::<Result<_, _>>()?,
            ),
            (Encoding::Json, Some(f)) => LogFormat::Json(json_format(f)?),
        };
        let file = file.unwrap_or("").trim();
        if file.is_empty() {
            return Ok(None);
        }
        check_path(file).map_err(|reason| err("accessLogFile", reason))?;
        Ok(Some(AccessLogConfig {
            file: file.to_string(),
            encoding,
            format: format.map(str::to_string),
            parsed,
        }))
    }
}

/// With JSON encoding, `accessLogFormat` is a JSON object of field name to format string.
fn json_format(text: &str) -> Result<Vec<(String, Format)>, AccessLogConfigError> {
    let err = |reason: String| AccessLogConfigError {
        field: "accessLogFormat",
        reason,
    };
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| {
            err(format!(
                "with JSON encoding this must be a JSON object: {e}"
            ))
        })?;
    map.into_iter()
        .map(|(k, v)| {
            let serde_json::Value::String(s) = v else {
                return Err(err(format!("the value of {k:?} must be a string")));
            };
            let f = Format::parse(&s).map_err(|e| err(format!("in {k:?}: {e}")))?;
            Ok((k, f))
        })
        .collect()
}

/// Stdout, stderr, or an absolute path of a regular file outside the kernel's filesystems.
fn check_path(file: &str) -> Result<(), String> {
    if matches!(file, "/dev/stdout" | "/dev/stderr") {
        return Ok(());
    }
    let path = Path::new(file);
    if !path.is_absolute() {
        return Err(format!(
            "{file:?} must be /dev/stdout, /dev/stderr or an absolute path"
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("{file:?} must not contain '..'"));
    }
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        return Err(format!(
            "{file:?} is under /proc, /sys or /dev; only /dev/stdout and /dev/stderr are allowed there"
        ));
    }
    Ok(())
}

/// What an HTTP request adds to its entry.
#[derive(Debug, Default)]
pub struct HttpInfo {
    pub method: String,
    /// The path with its query, as the client sent it.
    pub path: String,
    pub authority: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    pub headers: hyper::HeaderMap,
    pub response_code: u16,
    /// Why the agent answered itself (no upstream response), for the access log.
    pub failure: Option<String>,
}

/// The authority a request is for: the URI's (HTTP/2, absolute-form) or the `Host` header's.
pub fn request_authority<B>(req: &hyper::Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// Envoy's `%PROTOCOL%`.
pub fn protocol_name(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

impl HttpInfo {
    pub fn of_request<B>(req: &hyper::Request<B>) -> HttpInfo {
        let authority = request_authority(req);
        HttpInfo {
            method: req.method().as_str().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            authority,
            protocol: protocol_name(req.version()),
            headers: req.headers().clone(),
            response_code: 0,
            failure: None,
        }
    }
}

/// One TCP connection (logged when it closes) or one HTTP request (when its response ends).
#[derive(Debug)]
pub struct TcpRecord {
    /// The configuration in force when the connection was accepted.
    pub config: Arc<AccessLogConfig>,
    pub start: SystemTime,
    pub duration: Duration,
    pub labels: TcpLabels,
    /// From the downstream (client side), towards the upstream.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    pub failure_reason: Option<String>,
    pub connection_id: u64,
    /// Set for an HTTP request.
    pub http: Option<Box<HttpInfo>>,
}

#[derive(Debug, Default, Serialize)]
pub struct AccessLogStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The data path's handle: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: crossbeam_channel::Sender<TcpRecord>,
    pub stats: Arc<AccessLogStats>,
    ids: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start() -> io::Result<AccessLog> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let stats = Arc::new(AccessLogStats::default());
        let writer_stats = stats.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(&rx, &writer_stats))?;
        Ok(AccessLog {
            tx,
            stats,
            ids: Arc::new(AtomicU64::new(1)),
        })
    }

    /// A connection id for `%CONNECTION_ID%`.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn log(&self, record: TcpRecord) {
        if self.tx.try_send(record).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where entries go now: the file of the newest configuration seen.
struct Sink {
    file: String,
    out: Box<dyn Write + Send>,
}

fn open(file: &str) -> io::Result<Box<dyn Write + Send>> {
    Ok(match file {
        "/dev/stdout" => Box::new(io::stdout()),
        "/dev/stderr" => Box::new(io::stderr()),
        path => Box::new(io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                // Never write through a symlink someone planted at the configured path.
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)?,
        )),
    })
}

fn writer(rx: &crossbeam_channel::Receiver<TcpRecord>, stats: &AccessLogStats) {
    let mut sink: Option<Sink> = None;
    let mut line = String::with_capacity(1024);
    while let Ok(record) = rx.recv() {
        line.clear();
        render::record(&record, &mut line);
        if sink.as_ref().is_none_or(|s| s.file != record.config.file) {
            if let Some(mut old) = sink.take() {
                let _ = old.out.flush();
            }
            match open(&record.config.file) {
                Ok(out) => {
                    sink = Some(Sink {
                        file: record.config.file.clone(),
                        out,
                    })
                }
                Err(e) => {
                    failed(stats, &record.config.file, &e);
                    continue;
                }
            }
        }
        let Some(s) = sink.as_mut() else { continue };
        let mut result = s.out.write_all(line.as_bytes());
        if result.is_ok() && rx.is_empty() {
            result = s.out.flush();
        }
        match result {
            Ok(()) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failed(stats, &s.file, &e);
                // Reopen on the next entry (the file may have been removed or the disk freed).
                sink = None;
            }
        }
    }
}

fn failed(stats: &AccessLogStats, file: &str, e: &io::Error) {
    let n = stats.write_errors.fetch_add(1, Ordering::Relaxed);
    if n < 10 || n.is_multiple_of(1000) {
        warn!(file, error = %e, errors = n + 1, "cannot write the access log (MeshConfig accessLogFile)");
    }
}

#[cfg(test)]
mod tests;
