//! Envoy's access log format strings: `%OPERATOR%`, `%OPERATOR(ARG)%` and `%REQ(A?B):N%`
//! between literal text, parsed once when the configuration is loaded and rendered per entry.
//!
//! Hand-written: no Rust crate implements Envoy's command operators. The grammar follows
//! Envoy's substitution format parser: a `%` always starts a command, and a command that does
//! not parse is a configuration error naming its line and column, never a runtime failure.

use super::time::TimeFormat;

/// One command operator. The set is the one Istio's default formats (TEXT and JSON) and the
/// reference guide's production format use, plus the common address and identity operators.
#[derive(Clone, Debug, PartialEq)]
pub enum Operator {
    StartTime(Option<TimeFormat>),
    Duration,
    RequestDuration,
    ResponseDuration,
    ResponseTxDuration,
    BytesReceived,
    BytesSent,
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    RequestedServerName,
    RouteName,
    DownstreamPeerUriSan,
    UpstreamPeerUriSan,
    DownstreamTlsVersion,
    GrpcStatus,
    UpstreamRequestAttemptCount,
    ConnectionId,
    Hostname,
    /// `%REQ(X?Y)%`: request header X, else Y.
    Req(Header),
    /// `%RESP(X?Y)%`
    Resp(Header),
    /// `%TRAILER(X?Y)%`
    Trailer(Header),
}

/// A header operator's argument: the header, its fallback, and the longest value written.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub main: String,
    pub fallback: Option<String>,
    pub max_len: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Literal(String),
    Op(Operator),
}

/// A parsed format string.
#[derive(Clone, Debug, PartialEq)]
pub struct Format {
    pub parts: Vec<Part>,
}

/// Where and why a format string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {reason}")]
pub struct FormatError {
    /// 1-based, within the format string.
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, FormatError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            let start = text.len() - rest.len() + i;
            let (op, used) = parse_command(&rest[i..])
                .map_err(|(offset, reason)| position(text, start + offset, reason))?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Op(op));
            rest = &rest[i + used..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Format { parts })
    }

    /// Whether the whole format is one operator (JSON then keeps numbers as numbers).
    pub fn single_operator(&self) -> Option<&Operator> {
        match self.parts.as_slice() {
            [Part::Op(op)] => Some(op),
            _ => None,
        }
    }
}

fn position(text: &str, byte: usize, reason: String) -> FormatError {
    let before = &text[..byte.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    FormatError {
        line,
        column,
        reason,
    }
}

/// Parses the command at the start of `s` (which starts with `%`). Returns the operator and
/// the bytes it spans, or the offset into `s` and the reason it is wrong.
fn parse_command(s: &str) -> Result<(Operator, usize), (usize, String)> {
    let body = &s[1..];
    let name_len = body
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(body.len());
    let name = &body[..name_len];
    if name.is_empty() {
        return Err((
            0,
            "a '%' must start a command operator such as %START_TIME%".into(),
        ));
    }
    let mut at = 1 + name_len;
    let mut arg = None;
    if s[at..].starts_with('(') {
        let Some(close) = s[at..].find(')') else {
            return Err((at, format!("%{name}( has no closing ')'")));
        };
        arg = Some(&s[at + 1..at + close]);
        at += close + 1;
    }
    let mut max_len = None;
    if let Some(after) = s[at..].strip_prefix(':') {
        let digits = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        let n = after[..digits].parse::<usize>().map_err(|_| {
            (
                at,
                format!("%{name}: the length after ':' must be a number"),
            )
        })?;
        max_len = Some(n);
        at += 1 + digits;
    }
    if !s[at..].starts_with('%') {
        return Err((at, format!("%{name} is not closed with '%'")));
    }
    let op = operator(name, arg, max_len)?;
    Ok((op, at + 1))
}

fn operator(
    name: &str,
    arg: Option<&str>,
    max_len: Option<usize>,
) -> Result<Operator, (usize, String)> {
    use Operator as O;
    let header = |arg: Option<&str>| -> Result<Header, (usize, String)> {
        let arg = arg
            .filter(|a| !a.is_empty())
            .ok_or_else(|| (0, format!("%{name}(...)% needs a header name")))?;
        let (main, fallback) = match arg.split_once('?') {
            Some((m, f)) => (m, Some(f.to_ascii_lowercase())),
            None => (arg, None),
        };
        Ok(Header {
            main: main.to_ascii_lowercase(),
            fallback,
            max_len,
        })
    };
    let op = match name {
        "REQ" => return Ok(O::Req(header(arg)?)),
        "RESP" => return Ok(O::Resp(header(arg)?)),
        "TRAILER" => return Ok(O::Trailer(header(arg)?)),
        "START_TIME" => {
            let format = match arg {
                Some(a) if !a.is_empty() => Some(
                    TimeFormat::parse(a)
                        .map_err(|reason| (0, format!("%START_TIME({a})%: {reason}")))?,
                ),
                _ => None,
            };
            O::StartTime(format)
        }
        "DURATION" => O::Duration,
        "REQUEST_DURATION" => O::RequestDuration,
        "RESPONSE_DURATION" => O::ResponseDuration,
        "RESPONSE_TX_DURATION" => O::ResponseTxDuration,
        "BYTES_RECEIVED" => O::BytesReceived,
        "BYTES_SENT" => O::BytesSent,
        "PROTOCOL" => O::Protocol,
        "RESPONSE_CODE" => O::ResponseCode,
        "RESPONSE_CODE_DETAILS" => O::ResponseCodeDetails,
        "RESPONSE_FLAGS" => O::ResponseFlags,
        "CONNECTION_TERMINATION_DETAILS" => O::ConnectionTerminationDetails,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => O::UpstreamTransportFailureReason,
        "UPSTREAM_HOST" => O::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => O::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => O::UpstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => O::DownstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => O::DownstreamLocalAddressWithoutPort,
        "DOWNSTREAM_LOCAL_PORT" => O::DownstreamLocalPort,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            O::DownstreamRemoteAddress
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
        | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => O::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_REMOTE_PORT" => O::DownstreamRemotePort,
        "REQUESTED_SERVER_NAME" => O::RequestedServerName,
        "ROUTE_NAME" => O::RouteName,
        "DOWNSTREAM_PEER_URI_SAN" => O::DownstreamPeerUriSan,
        "UPSTREAM_PEER_URI_SAN" => O::UpstreamPeerUriSan,
        "DOWNSTREAM_TLS_VERSION" => O::DownstreamTlsVersion,
        "GRPC_STATUS" => O::GrpcStatus,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => O::UpstreamRequestAttemptCount,
        "CONNECTION_ID" => O::ConnectionId,
        "HOSTNAME" => O::Hostname,
        other => return Err((0, format!("unknown command operator %{other}%"))),
    };
    if arg.is_some_and(|a| !a.is_empty()) && !matches!(op, O::StartTime(_)) {
        return Err((0, format!("%{name}% takes no argument")));
    }
    if max_len.is_some() {
        return Err((
            0,
            format!("%{name}% takes no ':length' (only REQ, RESP and TRAILER do)"),
        ));
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_DEFAULT: &str = super::super::ISTIO_TEXT_FORMAT;

    #[test]
    fn istio_default_and_reference_guide_formats_parse() {
        let f = Format::parse(ISTIO_DEFAULT).unwrap();
        let ops = f.parts.iter().filter(|p| matches!(p, Part::Op(_))).count();
        assert_eq!(ops, 24);
        let guide = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\"\n\
                     %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT%\n\
                     %DURATION% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\"\n";
        let f = Format::parse(guide).unwrap();
        assert_eq!(
            f.parts[5],
            Part::Op(Operator::Req(Header {
                main: "x-envoy-original-path".into(),
                fallback: Some(":path".into()),
                max_len: None
            }))
        );
    }

    #[test]
    fn arguments_lengths_and_time_formats() {
        let f = Format::parse("%REQ(USER-AGENT):10% %START_TIME(%Y-%m-%d %3f)%").unwrap();
        assert!(matches!(&f.parts[0], Part::Op(Operator::Req(h)) if h.max_len == Some(10)));
        assert!(matches!(
            &f.parts[2],
            Part::Op(Operator::StartTime(Some(_)))
        ));
        assert_eq!(
            Format::parse("%BYTES_SENT%").unwrap().single_operator(),
            Some(&Operator::BytesSent)
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = Format::parse("[%START_TIME%]\n  %BYTES_SENT% %NOPE%").unwrap_err();
        assert_eq!((e.line, e.column), (2, 16));
        assert!(e.reason.contains("unknown command operator %NOPE%"), "{e}");
        let e = Format::parse("100% done").unwrap_err();
        assert_eq!((e.line, e.column), (1, 4));
        let e = Format::parse("%BYTES_SENT").unwrap_err();
        assert!(e.reason.contains("not closed"), "{e}");
        let e = Format::parse("%REQ(USER-AGENT%").unwrap_err();
        assert!(e.reason.contains("no closing ')'"), "{e}");
        let e = Format::parse("%REQ()%").unwrap_err();
        assert!(e.reason.contains("needs a header"), "{e}");
        let e = Format::parse("%DURATION(x)%").unwrap_err();
        assert!(e.reason.contains("takes no argument"), "{e}");
        let e = Format::parse("%DURATION:3%").unwrap_err();
        assert!(e.reason.contains("':length'"), "{e}");
        let e = Format::parse("%START_TIME(%Q)%").unwrap_err();
        assert!(e.reason.contains("%Q"), "{e}");
    }
}
