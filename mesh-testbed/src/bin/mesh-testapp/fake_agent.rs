//! `mesh-testapp run ...`: a stand-in for `mesh-agent run` with the same command line, used by
//! the testbed's own tests to exercise agent management (placement in the node's netns and
//! cgroup, readiness over the admin unix socket, stop/kill/restart) without the real agent.

use std::convert::Infallible;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

#[derive(clap::Args)]
pub struct FakeAgentArgs {
    #[arg(long)]
    manifests: PathBuf,
    #[arg(long)]
    node: String,
    #[arg(long)]
    cgroup: PathBuf,
    #[arg(long)]
    bpffs_dir: PathBuf,
    #[arg(long)]
    admin_socket: PathBuf,
    /// Exit with an error right away (to test failed starts).
    #[arg(long)]
    fail: bool,
}

pub async fn run(args: FakeAgentArgs) -> Result<()> {
    println!(
        "fake agent on {} manifests={} cgroup={} bpffs={} RUST_LOG={}",
        args.node,
        args.manifests.display(),
        args.cgroup.display(),
        args.bpffs_dir.display(),
        std::env::var("RUST_LOG").unwrap_or_default()
    );
    if args.fail {
        eprintln!("error: fake agent failing on purpose");
        std::process::exit(1);
    }
    let _ = std::fs::remove_file(&args.admin_socket);
    let listener = UnixListener::bind(&args.admin_socket)
        .with_context(|| format!("binding {}", args.admin_socket.display()))?;
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        let node = args.node.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, node.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, node: String) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz/ready" => (StatusCode::OK, "ready\n".to_string()),
        "/node" => (StatusCode::OK, format!("{node}\n")),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    Ok(resp)
}
