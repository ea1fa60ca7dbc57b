//! A minimal admin API client over the agent's unix socket (HTTP/1.1 with hyper).

use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// GET `path` from the admin socket; returns (status, body).
pub async fn get(socket: &Path, path: &str) -> anyhow::Result<(u16, String)> {
    request(socket, hyper::Method::GET, path).await
}

/// POST `path` (no body) and fail unless the agent answered 200.
pub async fn post_ok(socket: &Path, path: &str) -> anyhow::Result<String> {
    let (status, body) = request(socket, hyper::Method::POST, path).await?;
    if status != 200 {
        bail!("agent answered {status} for POST {path}: {}", body.trim());
    }
    Ok(body)
}

async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot connect to the agent's admin socket {} (is `mesh-agent run` running on this node? --admin-socket selects another path)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin socket handshake")?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .context("building the admin request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} on {}", socket.display()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the admin response")?;
    let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    Ok((status, body))
}

/// GET `path` and fail unless the agent answered 200.
pub async fn get_ok(socket: &Path, path: &str) -> anyhow::Result<String> {
    let (status, body) = get(socket, path).await?;
    if status != 200 {
        bail!("agent answered {status} for {path}: {}", body.trim());
    }
    Ok(body)
}
