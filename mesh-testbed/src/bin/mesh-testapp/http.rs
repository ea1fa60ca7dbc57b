//! The HTTP/1.1 test server: answers every GET with JSON describing itself, its peer and the
//! results of its `--call`s (how the demo builds bookinfo's call graph).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::{announce, parse_listen};

const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Request headers copied onto outgoing calls (trace context and user identity, as
/// bookinfo's services propagate them).
const PROPAGATED: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "baggage",
    "end-user",
    "cookie",
    "authorization",
];

#[derive(clap::Args)]
pub struct HttpArgs {
    #[arg(long, value_parser = parse_listen)]
    listen: SocketAddr,
    /// Service name reported in responses.
    #[arg(long)]
    service: String,
    /// Version reported in responses.
    #[arg(long, default_value = "v1")]
    version: String,
    /// NAME=URL fetched (HTTP/1.1 GET, 2 s timeout) for every request; repeatable.
    #[arg(long = "call", value_parser = parse_call)]
    calls: Vec<(String, String)>,
    /// HOST=IP: connect to IP for URLs naming HOST (the Host header keeps HOST); repeatable.
    #[arg(long = "resolve", value_parser = parse_call)]
    resolve: Vec<(String, String)>,
    /// Status of every answer without a `status` query parameter (a failing backend: 503).
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Print `request METHOD PATH host=HOST` on stdout for every request.
    #[arg(long)]
    log_requests: bool,
}

fn parse_call(s: &str) -> Result<(String, String)> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("expected NAME=VALUE, got {s:?}"))?;
    if name.is_empty() || url.is_empty() {
        bail!("expected NAME=VALUE, got {s:?}");
    }
    Ok((name.to_string(), url.to_string()))
}

struct Config {
    service: String,
    version: String,
    calls: Vec<(String, String)>,
    resolve: BTreeMap<String, String>,
    status: StatusCode,
    log_requests: bool,
}

pub async fn serve(args: HttpArgs) -> Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    announce(listener.local_addr().context("local address")?);
    let cfg = Arc::new(Config {
        service: args.service,
        version: args.version,
        calls: args.calls,
        resolve: args.resolve.into_iter().collect(),
        status: StatusCode::from_u16(args.status)
            .with_context(|| format!("--status {}", args.status))?,
        log_requests: args.log_requests,
    });
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        let local = stream
            .local_addr()
            .context("local address of a connection")?;
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let cfg = cfg.clone();
                async move {
                    // `?drip_ms=N`: the headers and a first line now, the rest N ms later (a
                    // slow response body).
                    let drip =
                        query_param(req.uri().query(), "drip_ms").and_then(|v| v.parse().ok());
                    match drip {
                        Some(ms) => Ok::<_, Infallible>(drip_response(ms).map(Either::Right)),
                        None => handle(req, cfg, local, peer)
                            .await
                            .map(|r| r.map(Either::Left)),
                    }
                }
            });
            // HTTP/1.1 or h2c (prior knowledge), as the first bytes say.
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .keep_alive(true)
                // A client that half-closes after its request still gets the response.
                .half_close(true);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("http: connection from {peer}: {e}");
            }
        });
    }
}

type Drip = http_body_util::StreamBody<
    futures::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, Infallible>>,
>;

/// A 200 whose body comes in two parts, `ms` apart.
fn drip_response(ms: u64) -> Response<Drip> {
    let parts = futures::stream::unfold(0u8, move |i| async move {
        match i {
            0 => Some((Bytes::from_static(b"first\n"), 1)),
            1 => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Some((Bytes::from_static(b"last\n"), 2))
            }
            _ => None,
        }
    });
    let frames = futures::StreamExt::map(parts, |b| Ok(hyper::body::Frame::data(b)));
    let mut resp = Response::new(http_body_util::StreamBody::new(futures::StreamExt::boxed(
        frames,
    )));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<Config>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if cfg.log_requests {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        println!("request {} {path} host={host}", req.method());
    }
    if req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v == "echo")
    {
        return Ok(upgrade_echo(req));
    }
    if path == "/healthz" {
        return Ok(reply(
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"ok\n"),
        ));
    }
    let query = req.uri().query().map(str::to_string);
    // Read the whole body first, as most apps do: a broken body never gets an answer.
    let (parts, body) = req.into_parts();
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(e) => {
            eprintln!("http: request body from {peer}: {e}");
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"bad body\n"),
            ));
        }
    };
    let req = Request::from_parts(parts, ());
    if let Some(ms) = query_param(query.as_deref(), "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query_param(query.as_deref(), "status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(cfg.status);
    let mut headers = serde_json::Map::new();
    let mut forward = Vec::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.insert(name.as_str().to_string(), Value::String(v));
        if PROPAGATED.contains(&name.as_str()) {
            forward.push((name.clone(), value.clone()));
        }
    }
    let tasks: Vec<_> = cfg
        .calls
        .iter()
        .map(|(name, url)| {
            let (name, url) = (name.clone(), url.clone());
            let forward = forward.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let (status, body) = fetch(&url, &forward, &cfg.resolve).await;
                json!({"name": name, "url": url, "status": status, "body": body})
            })
        })
        .collect();
    let mut calls = Vec::with_capacity(tasks.len());
    for t in tasks {
        calls.push(
            t.await
                .unwrap_or_else(|e| json!({"status": 0, "body": e.to_string()})),
        );
    }
    let body = json!({
        "service": cfg.service,
        "version": cfg.version,
        "pod_ip": local.ip().to_string(),
        "client": peer.to_string(),
        "method": req.method().as_str(),
        "http_version": format!("{:?}", req.version()),
        "path": path,
        "query": query,
        "body_bytes": body_bytes,
        "headers": headers,
        "calls": calls,
    });
    let mut text = body.to_string();
    text.push('\n');
    Ok(reply(status, "application/json", Bytes::from(text)))
}

/// `Upgrade: echo`: 101, then every byte sent back until the client closes.
fn upgrade_echo(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    eprintln!("http: upgraded echo: {e}");
                }
            }
            Err(e) => eprintln!("http: upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(hyper::header::UPGRADE, HeaderValue::from_static("echo"));
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    resp
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Splits `http://host[:port][/path]` into (authority with port, host, port, path).
fn parse_url(url: &str) -> Result<(String, String, u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported: {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("URL {url:?} has no host");
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .with_context(|| format!("bad port in URL {url:?}"))?;
            (h.to_string(), port)
        }
        _ => (authority.to_string(), 80),
    };
    Ok((authority.to_string(), host, port, path.to_string()))
}

/// GET `url`; errors become status 0 with the message as body.
async fn fetch(
    url: &str,
    forward: &[(HeaderName, HeaderValue)],
    resolve: &BTreeMap<String, String>,
) -> (u16, Value) {
    match tokio::time::timeout(CALL_TIMEOUT, fetch_inner(url, forward, resolve)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (0, Value::String(format!("{e:#}"))),
        Err(_) => (
            0,
            Value::String(format!("timed out after {CALL_TIMEOUT:?}")),
        ),
    }
}

async fn fetch_inner(
    url: &str,
    forward: &[(HeaderName, HeaderValue)],
    resolve: &BTreeMap<String, String>,
) -> Result<(u16, Value)> {
    let (authority, host, port, path) = parse_url(url)?;
    let target_host = resolve.get(&host).cloned().unwrap_or(host);
    let target_host = target_host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((target_host, port))
        .await
        .with_context(|| format!("connecting to {target_host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = Request::get(path.as_str()).header(HOST, authority.as_str());
    for (name, value) in forward {
        builder = builder.header(name, value);
    }
    let req = builder
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response body")?
        .to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, value))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (a, h, p, path) = parse_url("http://10.96.0.10:9080/details/0").unwrap();
        assert_eq!(
            (a.as_str(), h.as_str(), p, path.as_str()),
            ("10.96.0.10:9080", "10.96.0.10", 9080, "/details/0")
        );
        let (a, h, p, path) = parse_url("http://reviews").unwrap();
        assert_eq!(
            (a.as_str(), h.as_str(), p, path.as_str()),
            ("reviews", "reviews", 80, "/")
        );
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http://x:notaport/").is_err());
        assert_eq!(query_param(Some("a=1&status=503"), "status"), Some("503"));
        assert_eq!(query_param(None, "status"), None);
        assert!(parse_call("ratings=http://x").is_ok());
        assert!(parse_call("nourl").is_err());
    }
}
