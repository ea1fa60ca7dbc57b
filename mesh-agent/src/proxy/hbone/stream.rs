//! One HBONE tunnel as a byte stream: the CONNECT stream's `h2` halves read and written in
//! the caller's own task.
//!
//! hyper's upgrade (`hyper::upgrade::on`) would give the same stream, but it copies every
//! write into a boxed buffer and hands it through a channel to a task of its own that feeds
//! `h2` (hyper 1.12, `proto/h2/upgrade.rs`): one allocation, one copy and one task wake-up
//! more per write, on both agents, for every tunnel. ztunnel drives `h2` directly for the
//! same reason. Writes here take only what `h2` grants the stream (its flow-control window,
//! capped by the connection's send buffer, `SEND_BUFFER`), so the bytes `h2` holds per
//! tunnel stay bounded.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};

/// The two halves of an accepted (or answered) CONNECT stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    pending: Bytes,
    /// The write side has sent END_STREAM.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }

    /// Received bytes, waiting for a DATA frame if none are left; empty at the end of the
    /// peer's side of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        // The peer ended or abandoned its side cleanly: the end of the bytes.
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
                        _ => Err(to_io(e)),
                    });
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Moves up to `room` received bytes out through `put`, returning the window they
    /// held to the peer.
    fn poll_read_with(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]),
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_chunk(cx))?;
        let n = room.min(self.pending.len());
        if n > 0 {
            put(&self.pending[..n]);
            self.pending.advance(n);
            // Fails only when the stream is already gone, which the next read reports.
            let _ = self.recv.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Asks for room for this write on top of what is still buffered; `h2` assigns what
        // the windows allow, now or when the peer opens them.
        self.send.reserve_capacity(buf.len());
        let room = loop {
            match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    // The stream can no longer send: reset by the peer or closed.
                    None => return Poll::Ready(Err(self.reset_error(cx))),
                },
                n => break n,
            }
        };
        let n = room.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_shutdown_inner(&mut self) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // Leftover reserved capacity goes back to the connection with the END_STREAM.
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Why the send side stopped, as an I/O error.
    fn reset_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => {
                io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason))
            }
            Poll::Ready(Err(e)) => to_io(e),
            Poll::Pending => io::ErrorKind::BrokenPipe.into(),
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into())
    } else {
        io::Error::other(e)
    }
}

impl tokio::io::AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        self.get_mut()
            .poll_read_with(cx, room, |b| buf.put_slice(b))
    }
}

impl tokio::io::AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_inner(cx, buf)
    }

    /// `h2`'s connection task writes frames out as soon as they are queued.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_inner()
    }
}

impl hyper::rt::Read for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        self.get_mut()
            .poll_read_with(cx, room, |b| buf.put_slice(b))
    }
}

impl hyper::rt::Write for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_inner(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and a server `h2` connection over an in-memory pipe, with small windows so
    /// that flow control is exercised, and one CONNECT stream between them.
    async fn pair(window: u32) -> (H2Stream, H2Stream) {
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(window)
                .initial_connection_window_size(window)
                .handshake::<_, Bytes>(b)
                .await
                .expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("no error");
            let send = respond
                .send_response(hyper::Response::new(()), false)
                .expect("response");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake::<_, Bytes>(a)
            .await
            .expect("client handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (resp, send) = client
            .ready()
            .await
            .expect("ready")
            .send_request(req, false)
            .expect("sent");
        let server = server.await.expect("server task");
        let resp = resp.await.expect("response");
        (H2Stream::new(send, resp.into_body()), server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_past_the_windows() {
        let (client, mut server) = pair(16 << 10).await;
        // 1 MiB each way through 16 KiB windows: only done if capacity is released as read.
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 7000];
            loop {
                let n = server.read(&mut buf).await.expect("server read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                server.write_all(&buf[..n]).await.expect("server write");
            }
            server.shutdown().await.expect("server shutdown");
            got
        });
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            // Write and read at once: the echo needs the client to drain its window.
            let (mut r, mut w) = tokio::io::split(client);
            let ((), got) = tokio::join!(
                async {
                    w.write_all(&data).await.expect("client write");
                    w.shutdown().await.expect("client shutdown");
                },
                r.read_to_end(&mut back)
            );
            got.expect("client read");
            back
        });
        // A window never given back would stall the transfer: fail instead of hanging.
        let within = std::time::Duration::from_secs(20);
        let back = tokio::time::timeout(within, reader)
            .await
            .expect("the transfer finished")
            .expect("client task");
        let got = echo.await.expect("echo task");
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "the server read other bytes than were sent");
        assert!(
            back == expect,
            "the client read other bytes than were echoed"
        );
    }

    #[tokio::test]
    async fn a_half_close_ends_one_direction_only() {
        let (mut client, mut server) = pair(64 << 10).await;
        client.write_all(b"request").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to the end");
        assert_eq!(got, b"request");
        // The other direction still works after the client's END_STREAM.
        server.write_all(b"answer").await.expect("answer");
        server.shutdown().await.expect("server shutdown");
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .expect("read the answer");
        assert_eq!(back, b"answer");
        // Writing after shutting down is refused, not silently dropped.
        let err = client
            .write(b"late")
            .await
            .expect_err("write after shutdown");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_reset_stream_is_an_error_for_the_writer() {
        let (mut client, server) = pair(16 << 10).await;
        let H2Stream { mut send, .. } = server;
        send.send_reset(Reason::REFUSED_STREAM);
        // The writer fills the window, then learns of the reset instead of waiting forever.
        let chunk = vec![0u8; 8 << 10];
        let mut failed = None;
        for _ in 0..64 {
            match tokio::time::timeout(std::time::Duration::from_secs(5), client.write(&chunk))
                .await
                .expect("the write returned")
            {
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("a write failed after the reset");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::Other
            ),
            "{e:?}"
        );
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await;
        assert!(
            read.is_err(),
            "the reset shows on the read side too: {read:?}"
        );
    }
}
