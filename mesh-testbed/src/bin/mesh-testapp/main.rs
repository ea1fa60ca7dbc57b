//! mesh-testapp: small real servers and clients for tests and the demo.
//!
//! Servers print `listening <addr>` once bound and exit on SIGTERM/SIGINT.

mod fake_agent;
mod grpc;
mod hold;
mod http;
mod otlp;
mod tcp;
mod xfer;

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-testapp", about = "nodemesh test servers and clients")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 server answering every GET with JSON about itself (and its --call results).
    Http(http::HttpArgs),
    /// TCP echo server.
    Echo {
        #[arg(long, value_parser = parse_listen)]
        listen: SocketAddr,
    },
    /// Reads each connection to EOF, then answers `<bytes> <crc32 hex>` and closes.
    Sink {
        #[arg(long, value_parser = parse_listen)]
        listen: SocketAddr,
        /// Also print `received <peer> <bytes> <crc32 hex>` for each connection.
        #[arg(long)]
        report: bool,
    },
    /// Sends --bytes pseudo-random bytes to each connection and closes it at once.
    Blob {
        #[arg(long, value_parser = parse_listen)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: usize,
    },
    /// Sends N pseudo-random bytes, half-closes, and checks the sink's reply.
    Source(tcp::SourceArgs),
    /// Accepts connections and never reads from them (a stalled reader).
    Stall {
        #[arg(long, value_parser = parse_listen)]
        listen: SocketAddr,
    },
    /// Sends bytes with write, sendfile or splice, half-closes, checks the reply (echo or
    /// sink); `--connections N` repeats it. Prints `ok connections N bytes B`.
    Xfer(xfer::XferArgs),
    /// Writes without blocking to a server that never reads; prints `taken N` (bytes the
    /// connection took before pushing back) and `full yes|no`.
    Fill(xfer::FillArgs),
    /// Answers each connection with the peer address `<ip>:<port>` and closes.
    Peer {
        #[arg(long, value_parser = parse_listen)]
        listen: SocketAddr,
    },
    /// Client: connects, sends --send (if any), half-closes and prints everything received.
    Read(tcp::ReadArgs),
    /// Client against an echo server: one connection kept open; each stdin line is sent
    /// and its echo printed (`echo <line>`). Prints `connected <local addr>` first.
    Chat(tcp::ChatArgs),
    /// Client: an HTTP/1.1 `Upgrade: echo` request, then a message echoed through the
    /// upgraded connection (how WebSocket crosses a proxy).
    Upgrade(tcp::UpgradeArgs),
    /// Opens many connections (optionally one HTTP request each) and keeps them idle.
    Hold(hold::HoldArgs),
    /// Hostile HTTP/2 client: opens streams and resets them at once, in a loop.
    RapidReset(tcp::RapidResetArgs),
    /// gRPC echo server (tonic): unary, and bidirectional streaming.
    GrpcEcho(grpc::ServeArgs),
    /// gRPC client (tonic) against `grpc-echo`: unary calls, then one bidirectional stream.
    Grpc(grpc::ClientArgs),
    /// OTLP/gRPC trace receiver: prints each span received as a JSON line.
    OtlpReceiver(otlp::ReceiverArgs),
    /// A stand-in for `mesh-agent run` (same flags), for the testbed's own tests.
    #[command(hide = true)]
    Run(fake_agent::FakeAgentArgs),
}

/// `ADDR:PORT`, `:PORT` or `PORT` (the latter two listen on 0.0.0.0).
pub fn parse_listen(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    s.parse()
        .with_context(|| format!("invalid listen address {s:?} (want IP:PORT, :PORT or PORT)"))
}

/// Prints the line tests wait for.
pub fn announce(addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let server = match cli.cmd {
        Cmd::Source(args) => return tcp::source(&args),
        Cmd::Read(args) => return tcp::read(&args),
        Cmd::Chat(args) => return tcp::chat(&args),
        Cmd::Upgrade(args) => return tcp::upgrade(&args),
        Cmd::Xfer(args) => return xfer::xfer(&args),
        Cmd::Fill(args) => return xfer::fill(&args),
        other => other,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        let serve = async {
            match server {
                Cmd::Http(args) => http::serve(args).await,
                Cmd::Echo { listen } => tcp::echo(listen).await,
                Cmd::Sink { listen, report } => tcp::sink(listen, report).await,
                Cmd::Blob { listen, bytes } => tcp::blob(listen, bytes).await,
                Cmd::Peer { listen } => tcp::peer(listen).await,
                Cmd::Stall { listen } => tcp::stall(listen).await,
                Cmd::Run(args) => fake_agent::run(args).await,
                Cmd::GrpcEcho(args) => grpc::serve(args).await,
                Cmd::Grpc(args) => grpc::client(args).await,
                Cmd::RapidReset(args) => tcp::rapid_reset(args).await,
                Cmd::Hold(args) => hold::hold(args).await,
                Cmd::OtlpReceiver(args) => otlp::serve(args).await,
                Cmd::Source(_)
                | Cmd::Read(_)
                | Cmd::Chat(_)
                | Cmd::Upgrade(_)
                | Cmd::Xfer(_)
                | Cmd::Fill(_) => {
                    bail!("not a server")
                }
            }
        };
        tokio::select! {
            r = serve => r,
            r = shutdown_signal() => r,
        }
    })
}
