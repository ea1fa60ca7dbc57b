//! `hold`: opens many connections (each with one HTTP/1.1 request answered, or none), then
//! keeps them open and idle, for measuring what an idle keep-alive connection costs a proxy.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct HoldArgs {
    /// HOST:PORT to connect to.
    #[arg(long)]
    connect: String,
    /// Connections to open and keep.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Send one `GET /` on each and read its answer first (a keep-alive HTTP client).
    #[arg(long)]
    http: bool,
    /// How long to hold them (the caller usually kills the process sooner).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// Raises the open-files limit to its hard maximum: a thousand sockets exceed the usual 1024.
fn raise_nofile() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit");
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit");
        }
    }
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(s: &mut TcpStream) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.context("reading the response")?;
        if n == 0 {
            bail!("connection closed before the response ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("not a 200: {}", head.lines().next().unwrap_or_default());
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

/// Prints `holding N` once every connection is open (and answered), then waits.
pub async fn hold(args: HoldArgs) -> Result<()> {
    raise_nofile()?;
    let mut held = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut s = TcpStream::connect(&args.connect)
            .await
            .with_context(|| format!("connection {i} to {}", args.connect))?;
        if args.http {
            s.write_all(b"GET / HTTP/1.1\r\nHost: hold\r\n\r\n")
                .await
                .with_context(|| format!("request on connection {i}"))?;
            read_response(&mut s)
                .await
                .with_context(|| format!("connection {i}"))?;
        }
        held.push(s);
    }
    println!("holding {}", held.len());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    Ok(())
}
