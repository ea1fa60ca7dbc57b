//! Moving bytes both ways between the two sides of a proxied connection.
//!
//! Hand-written rather than `tokio::io::copy_bidirectional_with_sizes` for two reasons the
//! benchmark showed (docs/benchmarks.md, agent RSS):
//! - tokio allocates both buffers at their full size up front. Most mesh connections are
//!   request/response traffic that never fills 16 KiB, yet 32 such connections through one
//!   agent (both ends on the node) kept about 7 MB of buffers resident. Here each direction
//!   starts at [`INITIAL_BUFFER`] and doubles, up to the configured maximum, only when a read
//!   fills the buffer: bulk transfers still move 64 KiB per read.
//! - An idle connection holds no buffer at all: while a direction waits for data it reads into
//!   a small stack buffer and writes straight from it; a heap buffer exists only while data
//!   is queued behind a slow writer or a transfer keeps filling reads. Thousands of idle
//!   keep-alive connections then cost the agent their sockets' and tasks' memory only.
//! - tokio returns only an error when either direction fails, losing the byte counts; the
//!   telemetry wants the bytes moved before a reset as well.
//!
//! Semantics otherwise follow tokio's: both directions are polled from one task; EOF on one
//! side shuts down the write half of the other, and the reverse direction keeps flowing until
//! its own EOF (half-close).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::connections::Progress;

/// What each direction's heap buffer starts at: one TLS record's worth.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// The stack buffer an idle direction reads into: most requests and responses fit.
const STACK_READ: usize = 4 * 1024;

/// The outcome of [`relay`]: bytes moved each way, and the error that ended it, if any.
#[derive(Debug)]
pub struct Relayed {
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub error: Option<io::Error>,
}

/// Copies `a` to `b` and `b` to `a` until both directions reach EOF or one fails. Buffers
/// grow from [`INITIAL_BUFFER`] to at most `max_buffer` bytes per direction. Bytes moved are
/// also added to `progress` as they go (`a` to `b` is "received"), for `/connections`.
pub async fn relay<A, B>(a: &mut A, b: &mut B, max_buffer: usize, progress: &Progress) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay_revocable(a, b, max_buffer, Framing::default(), progress, None).await
}

/// [`relay`] that also ends, with a `PermissionDenied` error, when `revoked` is notified
/// (a policy change refuses the connection now).
pub async fn relay_revocable<A, B>(
    a: &mut A,
    b: &mut B,
    max_buffer: usize,
    framing: Framing,
    progress: &Progress,
    revoked: Option<&Notify>,
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let ends = Ends {
        revoked,
        idle_timeout: None,
    };
    relay_until(a, b, max_buffer, framing, progress, ends).await
}

/// A TLS record's largest plaintext (RFC 8446 §5.1).
const TLS_RECORD: usize = 16 * 1024;

/// What each side's writer puts in front of every write: reads toward that side are that
/// much shorter than the buffer, so that a full read and its header fill whole TLS records.
///
/// An HBONE tunnel's writes become HTTP/2 DATA frames with a 9-byte header, encrypted by
/// rustls in records of 16 KiB and buffered up to 64 KiB. A 64 KiB read became a frame of
/// 65,545 bytes: four full records and a `writev`, then a record and a `writev` of its own
/// for the last 9 bytes (31 bytes on the wire, seen under `strace` at the source under
/// iperf3), one more TCP segment, AEAD call and wake-up of the peer per 64 KiB. A read of
/// 65,527 bytes frames to exactly four records.
#[derive(Clone, Copy, Default, Debug)]
pub struct Framing {
    /// Header bytes per write into `a`.
    pub into_a: usize,
    /// Header bytes per write into `b`.
    pub into_b: usize,
}

impl Framing {
    /// The HTTP/2 DATA frame header: writes into an HBONE tunnel.
    pub const HBONE: usize = 9;
}

/// What ends a relay before both sides close.
#[derive(Clone, Copy, Default)]
pub struct Ends<'a> {
    /// Notified when a policy change refuses the connection now: `PermissionDenied`.
    pub revoked: Option<&'a Notify>,
    /// No byte moved either way for this long (DestinationRule
    /// `connectionPool.tcp.idleTimeout`): `TimedOut`.
    pub idle_timeout: Option<Duration>,
}

/// [`relay`] with the ends of [`Ends`]. The idle timer is one sleep per connection, re-armed
/// only when it fires after bytes moved: no timer work per read.
pub async fn relay_until<A, B>(
    a: &mut A,
    b: &mut B,
    max_buffer: usize,
    framing: Framing,
    progress: &Progress,
    ends: Ends<'_>,
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new(max_buffer, framing.into_b);
    let mut b_to_a = Direction::new(max_buffer, framing.into_a);
    let mut revoked = std::pin::pin!(async {
        match ends.revoked {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    });
    // (the timer, bytes moved when it was armed)
    let mut idle = ends
        .idle_timeout
        .map(|t| (Box::pin(tokio::time::sleep(t)), 0u64));
    let error = poll_fn(|cx| {
        if revoked.as_mut().poll(cx).is_ready() {
            let e = io::Error::new(
                io::ErrorKind::PermissionDenied,
                "closed: AuthorizationPolicy refuses this connection now",
            );
            return Poll::Ready(Some(e));
        }
        let ab = a_to_b.poll(cx, a, b, &progress.received);
        let ba = b_to_a.poll(cx, b, a, &progress.sent);
        match (ab, ba) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => return Poll::Ready(Some(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(None),
            _ => {}
        }
        if let (Some((timer, armed_at)), Some(timeout)) = (idle.as_mut(), ends.idle_timeout) {
            while timer.as_mut().poll(cx).is_ready() {
                let moved = a_to_b.moved + b_to_a.moved;
                if moved == *armed_at {
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("closed: idle for {timeout:?} (connectionPool.tcp.idleTimeout)"),
                    );
                    return Poll::Ready(Some(e));
                }
                *armed_at = moved;
                timer.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
        }
        Poll::Pending
    })
    .await;
    Relayed {
        a_to_b: a_to_b.moved,
        b_to_a: b_to_a.moved,
        error,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Copying,
    /// The reader reached EOF and everything read was written: shut down the writer.
    ShuttingDown,
    Done,
}

/// One direction's state: a buffer holding `buf[pos..filled]` not yet written.
struct Direction {
    buf: Box<[u8]>,
    max: usize,
    /// Bytes the writer frames each write with (see [`Framing`]).
    head: usize,
    pos: usize,
    filled: usize,
    read_eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    stage: Stage,
    moved: u64,
}

impl Direction {
    fn new(max: usize, head: usize) -> Self {
        let max = max.max(1);
        Direction {
            // No heap buffer until data queues up (see the module doc).
            buf: Box::default(),
            max,
            head,
            pos: 0,
            filled: 0,
            read_eof: false,
            need_flush: false,
            stage: Stage::Copying,
            moved: 0,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        progress: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self.stage {
                Stage::Done => return Poll::Ready(Ok(())),
                Stage::ShuttingDown => {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.stage = Stage::Done;
                }
                Stage::Copying => {
                    if self.pos == self.filled && !self.read_eof {
                        let polled = if self.buf.is_empty() {
                            self.poll_through_stack(cx, r, w, progress)
                        } else {
                            self.poll_fill(cx, r)
                        };
                        match polled {
                            Poll::Ready(r) => r?,
                            Poll::Pending => {
                                // Nothing to read now (or the writer took only part of a
                                // stack read, now queued): push out what was written so far.
                                if self.need_flush {
                                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                                    self.need_flush = false;
                                }
                                // Drained and waiting: give a small buffer back (a grown one
                                // stays while the transfer goes on).
                                if self.pos == self.filled && self.buf.len() <= INITIAL_BUFFER {
                                    self.buf = Box::default();
                                    (self.pos, self.filled) = (0, 0);
                                }
                                return Poll::Pending;
                            }
                        }
                        continue;
                    }
                    while self.pos < self.filled {
                        let n = ready!(
                            Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.filled])
                        )?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        self.pos += n;
                        self.moved += n as u64;
                        progress.fetch_add(n as u64, Ordering::Relaxed);
                        self.need_flush = true;
                    }
                    if self.read_eof {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                        self.stage = Stage::ShuttingDown;
                    }
                }
            }
        }
    }

    /// Without a heap buffer: reads into the stack and writes straight from it. What the writer
    /// does not take now is queued in a new heap buffer; a read that filled the stack buffer
    /// (more is coming) switches to the heap buffer for the next reads.
    fn poll_through_stack<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        progress: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut stack = [0u8; STACK_READ];
        let limit = STACK_READ.min(self.max);
        let mut rb = ReadBuf::new(&mut stack[..limit]);
        ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
        let data = rb.filled();
        if data.is_empty() {
            self.read_eof = true;
            return Poll::Ready(Ok(()));
        }
        let mut written = 0;
        while written < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    self.moved += n as u64;
                    progress.fetch_add(n as u64, Ordering::Relaxed);
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        let rest = &data[written..];
        let full = data.len() == limit;
        if !rest.is_empty() || full {
            let mut buf = vec![0; INITIAL_BUFFER.min(self.max).max(rest.len())];
            buf[..rest.len()].copy_from_slice(rest);
            self.buf = buf.into_boxed_slice();
            (self.pos, self.filled) = (0, rest.len());
        }
        if rest.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            // The writer registered the waker; the rest waits in the heap buffer.
            Poll::Pending
        }
    }

    /// How much of the buffer one read may fill: with a framing writer, whole TLS records'
    /// worth less the frame's header, where the buffer holds at least one record.
    fn read_limit(&self) -> usize {
        let len = self.buf.len();
        if self.head == 0 || len < TLS_RECORD {
            return len;
        }
        len / TLS_RECORD * TLS_RECORD - self.head
    }

    /// Reads into the (empty) buffer, growing it first if the previous read filled it.
    fn poll_fill<R>(&mut self, cx: &mut Context<'_>, r: &mut R) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        let limit = self.read_limit();
        if self.filled == limit && self.buf.len() < self.max {
            let grown = (self.buf.len() * 2).min(self.max);
            self.buf = vec![0; grown].into_boxed_slice();
        }
        let limit = self.read_limit();
        let mut rb = ReadBuf::new(&mut self.buf[..limit]);
        ready!(Pin::new(r).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.pos = 0;
        self.filled = n;
        if n == 0 {
            self.read_eof = true;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A pattern that shows misordered or lost bytes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_revoked_relay_ends_with_permission_denied_and_keeps_its_counts() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let revoke = Notify::new();
        let progress = Progress::default();
        let relay = relay_revocable(
            &mut a,
            &mut b,
            4096,
            Framing::default(),
            &progress,
            Some(&revoke),
        );
        let traffic = async {
            client.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
            // Revoked while idle: the relay ends though neither side closed.
            revoke.notify_one();
        };
        let (r, ()) = tokio::join!(relay, traffic);
        let e = r.error.expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(r.a_to_b, 5);
    }

    /// An idle timeout ends a connection where nothing moves, and only such a connection.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_ends_only_a_silent_connection() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let progress = Progress::default();
        let ends = Ends {
            revoked: None,
            idle_timeout: Some(Duration::from_secs(1)),
        };
        let started = tokio::time::Instant::now();
        let relay = relay_until(&mut a, &mut b, 4096, Framing::default(), &progress, ends);
        // A byte every 600 ms for 3 s keeps it open (each timer period saw bytes move), then
        // silence ends it one to two periods later.
        let traffic = async {
            for _ in 0..5 {
                client.write_all(b"x").await.unwrap();
                let mut got = [0u8; 1];
                server.read_exact(&mut got).await.unwrap();
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
        };
        let (r, ()) = tokio::join!(relay, traffic);
        let e = r.error.expect("ended by the idle timeout");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(r.a_to_b, 5);
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_millis(3000) && lived <= Duration::from_millis(5000),
            "ended after {lived:?}"
        );
    }

    #[tokio::test]
    async fn moves_both_ways_with_half_close_and_grows_for_bulk() {
        let (mut client, mut a) = duplex(256 * 1024);
        let (mut b, mut server) = duplex(256 * 1024);
        let relay =
            tokio::spawn(
                async move { relay(&mut a, &mut b, 64 * 1024, &Progress::default()).await },
            );

        let up = pattern(1_000_000);
        let down = pattern(300_000);
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            // Half-close: the server sees EOF but can still answer.
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got_up = Vec::new();
        server.read_to_end(&mut got_up).await.unwrap();
        assert_eq!(got_up, up);
        server.write_all(&down).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), down);

        let r = relay.await.unwrap();
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!((r.a_to_b, r.b_to_a), (1_000_000, 300_000));
    }

    #[tokio::test]
    async fn buffer_grows_only_when_reads_fill_it() {
        let (mut client, mut a) = duplex(1 << 20);
        let mut d = Direction::new(64 * 1024, 0);
        let (mut sink, _keep) = duplex(1 << 20);
        // Idle, and small writes: no heap buffer at all (read on the stack, written through).
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert!(d.buf.is_empty());
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert!(d.buf.is_empty(), "{}", d.buf.len());
        assert_eq!(d.moved, 18);
        // A bulk write fills it: it doubles up to the maximum, never beyond.
        client.write_all(&pattern(512 * 1024)).await.unwrap();
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert_eq!(d.buf.len(), 64 * 1024);
        assert_eq!(d.moved, 18 + 512 * 1024);
    }

    /// Takes every write whole and keeps its size.
    #[derive(Default)]
    struct WriteSizes(Vec<usize>);

    impl AsyncWrite for WriteSizes {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn full_reads_toward_a_tunnel_frame_to_whole_tls_records() {
        let (mut client, mut a) = duplex(1 << 20);
        let mut d = Direction::new(64 * 1024, Framing::HBONE);
        let mut sink = WriteSizes::default();
        client.write_all(&pattern(512 * 1024)).await.unwrap();
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert_eq!(d.moved, 512 * 1024);
        // The first read goes through the stack buffer; the last takes what is left.
        let sizes = &sink.0[1..sink.0.len() - 1];
        assert!(sizes.len() > 3, "{:?}", sink.0);
        for &n in sizes {
            assert_eq!((n + Framing::HBONE) % TLS_RECORD, 0, "{n} in {:?}", sink.0);
        }
        assert_eq!(sizes.iter().max(), Some(&(64 * 1024 - Framing::HBONE)));
        // Without framing, reads fill the buffer.
        let (mut client, mut a) = duplex(1 << 20);
        let mut d = Direction::new(64 * 1024, 0);
        let mut sink = WriteSizes::default();
        client.write_all(&pattern(512 * 1024)).await.unwrap();
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert_eq!(sink.0.iter().max(), Some(&(64 * 1024)));
    }

    #[tokio::test]
    async fn a_slow_writer_queues_the_rest_and_the_buffer_goes_when_drained() {
        let (mut client, mut a) = duplex(1 << 20);
        // The writer takes at most 1000 bytes before it must be read.
        let (mut sink, mut reader) = duplex(1000);
        let mut d = Direction::new(64 * 1024, 0);
        client.write_all(&pattern(3000)).await.unwrap();
        poll_fn(|cx| {
            let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
            Poll::Ready(())
        })
        .await;
        assert_eq!(
            (d.buf.len(), d.filled - d.pos),
            (INITIAL_BUFFER, 2000),
            "the rest is queued"
        );
        let mut got = Vec::new();
        while got.len() < 3000 {
            let mut chunk = [0u8; 1000];
            let n = reader.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
            poll_fn(|cx| {
                let _ = d.poll(cx, &mut a, &mut sink, &AtomicU64::new(0));
                Poll::Ready(())
            })
            .await;
        }
        assert_eq!(got, pattern(3000), "in order, nothing lost");
        assert!(
            d.buf.is_empty(),
            "drained and idle: the buffer is given back"
        );
    }

    #[tokio::test]
    async fn an_error_keeps_the_counts() {
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut b, mut server) = duplex(64 * 1024);
        let relay =
            tokio::spawn(
                async move { relay(&mut a, &mut b, 64 * 1024, &Progress::default()).await },
            );
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        drop(server);
        // Writing on towards a peer that is gone fails (BrokenPipe) and ends the relay.
        client.write_all(b"world").await.unwrap();
        let r = relay.await.unwrap();
        assert_eq!(r.error.map(|e| e.kind()), Some(io::ErrorKind::BrokenPipe));
        assert_eq!((r.a_to_b, r.b_to_a), (5, 0));
    }
}
