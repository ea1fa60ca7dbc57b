//! HBONE: a TCP connection between two enrolled pods travels as one HTTP/2 CONNECT stream
//! inside a mutual-TLS connection from the source pod's namespace to the destination pod's
//! IP on 15008. `pool` is the source side, `crate::proxy::inbound` the destination side, and
//! `tls` the certificates and identity checks both use.

pub mod pool;
pub mod stream;
pub mod tls;

use std::time::Duration;

/// Settings of the source side's connection pool.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// CONNECT streams carried at most by one TLS connection; one more opens a new one.
    pub max_streams: usize,
    /// A TLS connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for TCP connect plus the TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
}

/// HTTP/2 flow-control windows. The defaults (64 KiB) cap a stream at one window per RTT;
/// these let a single tunnel fill a fast link, while per-connection buffering stays bounded.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest HTTP/2 DATA frame: fewer frames (and TLS records) per byte moved.
pub const MAX_FRAME_SIZE: u32 = 256 << 10;
/// Largest header list accepted on a tunnel connection (a CONNECT's are tiny); hyper's default.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Bytes one tunnel may have queued in `h2`, not yet written to the TLS connection, before
/// its writer waits: twice the relay's largest read at the default `--buffer-size`. hyper's
/// defaults (1 MiB client, 400 KiB server) let a bulk sender queue a megabyte before the
/// connection's task wrote any of it, and sent it in bursts: iperf3 through two agents gave
/// 5.7 Gbit/s with those, 6.2 with 128 KiB and 64 KiB (alternated runs, 2026-11-27), and a
/// busy tunnel holds less memory.
pub const SEND_BUFFER: usize = 128 << 10;
