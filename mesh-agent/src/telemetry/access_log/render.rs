//! Rendering one entry: each operator's value for a TCP connection, as Envoy's TCP proxy
//! reports it (HTTP-only operators are absent: `-` in TEXT, `null` in JSON).

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::OnceLock;

use super::format::{Format, Header, Operator, Part};
use super::{HttpInfo, LogFormat, TcpRecord, time};
use crate::telemetry::metrics::Reporter;

enum Value<'a> {
    Absent,
    Num(u64),
    Str(Cow<'a, str>),
    /// `%START_TIME%`: rendered straight into the output.
    Time(Option<&'a time::TimeFormat>),
}

/// Appends the entry for `r` to `out` (TEXT: the format's text; JSON: one object and `\n`).
pub fn record(r: &TcpRecord, out: &mut String) {
    match &r.config.parsed {
        LogFormat::Text(f) => text(f, r, out),
        LogFormat::Json(fields) => {
            out.push('{');
            for (i, (key, f)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_string(key, out);
                out.push(':');
                match f.single_operator().map(|op| value(op, r)) {
                    Some(Value::Absent) => out.push_str("null"),
                    Some(Value::Num(n)) => {
                        let _ = write!(out, "{n}");
                    }
                    _ => {
                        let mut s = String::new();
                        text(f, r, &mut s);
                        json_string(&s, out);
                    }
                }
            }
            out.push_str("}\n");
        }
    }
}

fn text(f: &Format, r: &TcpRecord, out: &mut String) {
    for part in &f.parts {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::Op(op) => match value(op, r) {
                Value::Absent => out.push('-'),
                Value::Num(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Str(s) => out.push_str(&s),
                Value::Time(None) => time::render_default(r.start, out),
                Value::Time(Some(tf)) => tf.render(r.start, out),
            },
        }
    }
}

fn value<'a>(op: &'a Operator, r: &'a TcpRecord) -> Value<'a> {
    use Operator as O;
    if let Some(h) = &r.http
        && let Some(v) = http_value(op, h)
    {
        return v;
    }
    let addr = |a: Option<std::net::SocketAddr>| a.map_or(Value::Absent, |a| owned(a.to_string()));
    let destination = r.labels.reporter == Reporter::Destination;
    match op {
        O::StartTime(f) => Value::Time(f.as_ref()),
        O::Duration => Value::Num(u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX)),
        O::BytesReceived => Value::Num(r.bytes_received),
        O::BytesSent => Value::Num(r.bytes_sent),
        // Envoy's TCP proxy reports response code 0.
        O::ResponseCode => Value::Num(0),
        O::ResponseFlags => Value::Str(Cow::Borrowed(r.labels.flags.as_str())),
        O::UpstreamTransportFailureReason => r
            .failure_reason
            .as_deref()
            .map_or(Value::Absent, |s| Value::Str(Cow::Borrowed(s))),
        O::UpstreamHost => addr(r.upstream_host),
        O::UpstreamCluster => owned(cluster(r)),
        O::UpstreamLocalAddress => addr(r.upstream_local),
        O::DownstreamLocalAddress => addr(Some(r.downstream_local)),
        O::DownstreamLocalAddressWithoutPort => owned(r.downstream_local.ip().to_string()),
        O::DownstreamLocalPort => Value::Num(u64::from(r.downstream_local.port())),
        O::DownstreamRemoteAddress => addr(Some(r.downstream_remote)),
        O::DownstreamRemoteAddressWithoutPort => owned(r.downstream_remote.ip().to_string()),
        O::DownstreamRemotePort => Value::Num(u64::from(r.downstream_remote.port())),
        O::DownstreamPeerUriSan => match (&r.labels.source_principal, destination) {
            (Some(id), true) if r.labels.mutual_tls => owned(id.to_string()),
            _ => Value::Absent,
        },
        O::UpstreamPeerUriSan => match (&r.labels.destination_principal, destination) {
            (Some(id), false) => owned(id.to_string()),
            _ => Value::Absent,
        },
        O::DownstreamTlsVersion if destination && r.labels.mutual_tls => {
            Value::Str(Cow::Borrowed("TLSv1.3"))
        }
        O::ConnectionId => Value::Num(r.connection_id),
        O::Hostname => Value::Str(Cow::Borrowed(hostname())),
        // HTTP-only, or details a TCP connection does not have.
        O::Protocol
        | O::ResponseCodeDetails
        | O::ConnectionTerminationDetails
        | O::RequestDuration
        | O::ResponseDuration
        | O::ResponseTxDuration
        | O::RequestedServerName
        | O::RouteName
        | O::DownstreamTlsVersion
        | O::GrpcStatus
        | O::UpstreamRequestAttemptCount
        | O::Req(Header { .. })
        | O::Resp(_)
        | O::Trailer(_) => Value::Absent,
    }
}

/// The operators an HTTP request answers differently from a TCP connection.
fn http_value<'a>(op: &'a Operator, h: &'a HttpInfo) -> Option<Value<'a>> {
    use Operator as O;
    let s = |v: &'a str| Some(Value::Str(Cow::Borrowed(v)));
    match op {
        O::Protocol => s(h.protocol),
        O::ResponseCode => Some(Value::Num(u64::from(h.response_code))),
        O::ResponseCodeDetails => s(if h.failure.is_some() {
            "upstream_reset_before_response_started"
        } else {
            "via_upstream"
        }),
        O::UpstreamRequestAttemptCount => Some(Value::Num(1)),
        O::Req(header) => Some(request_header(h, header)),
        _ => None,
    }
}

fn request_header<'a>(h: &'a HttpInfo, header: &Header) -> Value<'a> {
    let pseudo = |name: &str| -> Option<&'a str> {
        match name {
            ":method" => Some(&h.method),
            ":path" => Some(&h.path),
            ":authority" | "host" => h.authority.as_deref(),
            ":scheme" => Some("http"),
            _ => h.headers.get(name).and_then(|v| v.to_str().ok()),
        }
    };
    let found = pseudo(&header.main).or_else(|| header.fallback.as_deref().and_then(pseudo));
    match found {
        None => Value::Absent,
        Some(v) => match header.max_len {
            Some(n) if v.len() > n => {
                let mut end = n;
                while !v.is_char_boundary(end) {
                    end -= 1;
                }
                Value::Str(Cow::Borrowed(&v[..end]))
            }
            _ => Value::Str(Cow::Borrowed(v)),
        },
    }
}

fn owned<'a>(s: String) -> Value<'a> {
    Value::Str(Cow::Owned(s))
}

/// Istio's cluster names: `outbound|PORT||HOST`, `inbound|PORT||`, `PassthroughCluster`.
fn cluster(r: &TcpRecord) -> String {
    let port = r.downstream_local.port();
    match (r.labels.reporter, &r.labels.service) {
        (Reporter::Destination, _) => format!("inbound|{port}||"),
        (Reporter::Source, Some(svc)) => format!("outbound|{port}||{}", svc.fqdn),
        (Reporter::Source, None) => "PassthroughCluster".into(),
    }
}

fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer and its length are valid; gethostname NUL-terminates within it
        // (or truncates, which the search for NUL below handles).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return "-".into();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    })
}

/// A JSON string literal (serde_json's escaping, without building a `Value`).
fn json_string(s: &str, out: &mut String) {
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("null"),
    }
}
