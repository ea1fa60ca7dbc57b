//! Trace context in request headers, as Envoy reads and writes it: W3C `traceparent` (with
//! `tracestate` passed through untouched), B3 in its multi-header (`x-b3-*`) and single-header
//! (`b3`) forms, and `x-request-id`.
//!
//! Each agent hop is one span: the hop reads the caller's context (the app's, or the source
//! agent's), makes its own span a child of it, and writes its own span id into every form the
//! request carries, so the next hop (the destination agent, then the app) parents on it.
//!
//! The ids are formatted by hand into fixed buffers: a few lines, and no allocation beyond
//! the header values themselves.

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// This hop's span: its trace, its own id, its parent's id, and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
}

/// What a request's headers say about its caller's span.
#[derive(Debug, Default, PartialEq, Eq)]
struct Incoming {
    ids: Option<([u8; 16], [u8; 8])>,
    /// The caller's sampling decision, if it made one.
    sampled: Option<bool>,
}

/// Gives the request an `x-request-id` (a random UUID) unless it has one.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(X_REQUEST_ID) {
        let id = uuid::Uuid::new_v4();
        let mut buf = uuid::Uuid::encode_buffer();
        let text = id.hyphenated().encode_lower(&mut buf);
        if let Ok(v) = HeaderValue::from_str(text) {
            headers.insert(X_REQUEST_ID, v);
        }
    }
}

/// Starts this hop's span: a child of the caller's span when the headers carry one (keeping
/// its sampling decision), else the root of a new trace, sampled with `percent` chance.
pub fn begin(headers: &HeaderMap, percent: f64) -> SpanContext {
    let incoming = extract(headers);
    let sampled = incoming
        .sampled
        .unwrap_or_else(|| fastrand::f64() * 100.0 < percent);
    let (trace_id, parent_id) = match incoming.ids {
        Some((trace, parent)) => (trace, Some(parent)),
        None => (nonzero_u128().to_be_bytes(), None),
    };
    SpanContext {
        trace_id,
        span_id: nonzero_u64().to_be_bytes(),
        parent_id,
        sampled,
    }
}

/// Writes `span` as the parent for the next hop, in W3C and in B3 (the single-header form only
/// where the request already used it); `tracestate` is left as it came.
pub fn inject(headers: &mut HeaderMap, span: &SpanContext) {
    let mut trace = [0u8; 32];
    hex(&span.trace_id, &mut trace);
    let mut id = [0u8; 16];
    hex(&span.span_id, &mut id);
    let flag = if span.sampled { b'1' } else { b'0' };

    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    tp[3..35].copy_from_slice(&trace);
    tp[35] = b'-';
    tp[36..52].copy_from_slice(&id);
    tp[52..54].copy_from_slice(b"-0");
    tp[54] = flag;
    set(headers, TRACEPARENT, &tp);

    set(headers, B3_TRACE, &trace);
    set(headers, B3_SPAN, &id);
    set(headers, B3_SAMPLED, &[flag]);
    headers.remove(B3_FLAGS);
    match span.parent_id {
        Some(p) => {
            let mut parent = [0u8; 16];
            hex(&p, &mut parent);
            set(headers, B3_PARENT, &parent);
        }
        None => {
            headers.remove(B3_PARENT);
        }
    }
    if headers.contains_key(B3) {
        // {trace}-{span}-{sampled}
        let mut single = [0u8; 51];
        single[..32].copy_from_slice(&trace);
        single[32] = b'-';
        single[33..49].copy_from_slice(&id);
        single[49] = b'-';
        single[50] = flag;
        set(headers, B3, &single);
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, ascii_hex: &[u8]) {
    if let Ok(v) = HeaderValue::from_bytes(ascii_hex) {
        headers.insert(name, v);
    }
}

/// The caller's context: `traceparent` first, then B3's headers, then B3's single header.
fn extract(headers: &HeaderMap) -> Incoming {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(found) = text(&TRACEPARENT).and_then(traceparent) {
        return found;
    }
    let sampled = text(&B3_FLAGS)
        .filter(|f| *f == "1")
        .map(|_| true)
        .or_else(|| text(&B3_SAMPLED).and_then(b3_sampled));
    if let (Some(t), Some(s)) = (text(&B3_TRACE), text(&B3_SPAN))
        && let (Some(trace), Some(span)) = (b3_trace_id(t), parse_hex::<8>(s))
        && span != [0; 8]
    {
        return Incoming {
            ids: Some((trace, span)),
            sampled,
        };
    }
    if let Some(found) = text(&B3).and_then(b3_single) {
        return found;
    }
    Incoming { ids: None, sampled }
}

/// `version-traceid-parentid-flags`. Version `ff` and all-zero ids are invalid; a later
/// version is read as 00 when its first four fields have 00's shape (W3C's rule).
fn traceparent(v: &str) -> Option<Incoming> {
    let v = v.trim();
    let b = v.as_bytes();
    if b.len() < 55 || (b.len() > 55 && (v.starts_with("00") || b[55] != b'-')) {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = parse_hex::<1>(&v[..2])?;
    let flags = parse_hex::<1>(&v[53..55])?;
    let trace = parse_hex::<16>(&v[3..35])?;
    let span = parse_hex::<8>(&v[36..52])?;
    if version == [0xff] || trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some(Incoming {
        ids: Some((trace, span)),
        sampled: Some(flags[0] & 1 == 1),
    })
}

/// `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or only the sampling state (`0`, `1`,
/// `d`).
fn b3_single(v: &str) -> Option<Incoming> {
    let mut parts = v.trim().split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        return Some(Incoming {
            ids: None,
            sampled: Some(b3_sampled(first)?),
        });
    };
    let trace = b3_trace_id(first)?;
    let span = parse_hex::<8>(second)?;
    if span == [0; 8] {
        return None;
    }
    let sampled = match parts.next() {
        Some(s) => Some(b3_sampled(s)?),
        None => None,
    };
    Some(Incoming {
        ids: Some((trace, span)),
        sampled,
    })
}

fn b3_sampled(v: &str) -> Option<bool> {
    match v {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// 16 or 32 hex digits; a 64-bit id is widened with zeros in front.
fn b3_trace_id(v: &str) -> Option<[u8; 16]> {
    let id = match v.len() {
        32 => parse_hex::<16>(v)?,
        16 => {
            let low = parse_hex::<8>(v)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn parse_hex<const N: usize>(v: &str) -> Option<[u8; N]> {
    let b = v.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// Lower-case hex of `bytes` into `out` (twice as long).
pub fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn a_w3c_parent_is_continued_with_its_sampling_decision() {
        for (flags, sampled) in [("01", true), ("00", false), ("03", true)] {
            let h = headers(&[
                ("traceparent", &format!("00-{TRACE}-{SPAN}-{flags}")),
                ("tracestate", "congo=t61rcWkgMzE"),
            ]);
            let span = begin(&h, 0.0);
            assert_eq!(span.trace_id, parse_hex::<16>(TRACE).unwrap());
            assert_eq!(span.parent_id, Some(parse_hex::<8>(SPAN).unwrap()));
            assert_ne!(span.span_id, span.parent_id.unwrap());
            assert_eq!(span.sampled, sampled, "{flags}");
            let mut h = h;
            inject(&mut h, &span);
            let mut id = [0u8; 16];
            hex(&span.span_id, &mut id);
            let id = std::str::from_utf8(&id).unwrap();
            let f = if sampled { "01" } else { "00" };
            assert_eq!(h["traceparent"], format!("00-{TRACE}-{id}-{f}").as_str());
            assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
            assert_eq!(h["x-b3-traceid"], TRACE);
            assert_eq!(h["x-b3-spanid"], id);
            assert_eq!(h["x-b3-parentspanid"], SPAN);
            assert_eq!(h["x-b3-sampled"], if sampled { "1" } else { "0" });
            assert!(
                !h.contains_key("b3"),
                "only written where the request used it"
            );
        }
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "x".repeat(32)),
            String::new(),
        ] {
            assert_eq!(
                extract(&headers(&[("traceparent", &bad)])),
                Incoming::default(),
                "{bad}"
            );
        }
        // A later version with more fields is read as version 00.
        let later = format!("01-{TRACE}-{SPAN}-01-what-comes-next");
        assert!(extract(&headers(&[("traceparent", &later)])).ids.is_some());
    }

    #[test]
    fn b3_headers_and_the_single_header_are_read() {
        let h = headers(&[
            ("x-b3-traceid", SPAN),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]);
        let got = extract(&h);
        let (trace, span) = got.ids.unwrap();
        assert_eq!(&trace[..8], &[0; 8], "64-bit trace ids are widened");
        assert_eq!(span, parse_hex::<8>(SPAN).unwrap());
        assert_eq!(got.sampled, Some(true));
        let debug = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&debug).sampled, Some(true));
        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-0-{SPAN}"))]);
        let got = extract(&single);
        assert_eq!(got.sampled, Some(false));
        assert!(got.ids.is_some());
        let mut h = single;
        let span = begin(&h, 100.0);
        assert!(!span.sampled, "the caller's decision wins");
        inject(&mut h, &span);
        assert!(h["b3"].to_str().unwrap().starts_with(&format!("{TRACE}-")));
        assert!(h["b3"].to_str().unwrap().ends_with("-0"));
        // Only a decision: a new trace that keeps it.
        let deny = headers(&[("b3", "0")]);
        assert!(!begin(&deny, 100.0).sampled);
        assert!(begin(&headers(&[("b3", "d")]), 0.0).sampled);
        assert!(begin(&headers(&[("b3", "garbage")]), 100.0).sampled);
    }

    #[test]
    fn new_traces_are_sampled_at_the_configured_rate() {
        let h = HeaderMap::new();
        assert!((0..200).all(|_| !begin(&h, 0.0).sampled));
        assert!((0..200).all(|_| begin(&h, 100.0).sampled));
        let n = (0..10_000).filter(|_| begin(&h, 10.0).sampled).count();
        assert!((700..1300).contains(&n), "{n}");
        let root = begin(&h, 100.0);
        assert_eq!(root.parent_id, None);
        assert_ne!(root.trace_id, [0; 16]);
        let mut h = h;
        inject(&mut h, &root);
        assert!(!h.contains_key("x-b3-parentspanid"));
    }

    #[test]
    fn a_request_id_is_generated_only_when_missing() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        ensure_request_id(&mut h);
        assert_eq!(h["x-request-id"], id.as_str());
    }
}
