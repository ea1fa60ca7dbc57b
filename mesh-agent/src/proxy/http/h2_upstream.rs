//! Requests on a shared HTTP/2 connection to a meshed pod ([`super::shared`]), sent with the
//! `h2` crate directly.
//!
//! hyper's HTTP/2 client hands each request through a channel to a task of its own, which
//! spawns one more task per request to wait for the response and hands that back through a
//! oneshot (hyper 1.12, `proto/h2/client.rs`, `poll_pipe`): a spawn, two channel hand-offs
//! and two more task wake-ups per request, on the busiest path of the client's agent. Here
//! the request's own task opens the stream and waits for the response. A request body that
//! is still streaming when the head is sent is piped by a task of its own, as in hyper, since
//! it may go on after the response has come (gRPC streams both ways).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Method, Request, Response, header};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use super::body::BoxError;
use crate::proxy::hbone::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, STREAM_WINDOW};

/// Streams opened before the server's SETTINGS say how many it takes (hyper's default, the
/// minimum RFC 9113 recommends servers allow).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Bytes of request bodies `h2` may hold per stream before the sender waits (hyper's
/// default).
const MAX_SEND_BUFFER: usize = 1 << 20;
/// Streams the peer may make us reset for its protocol errors before the connection goes
/// (hyper's default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// A handle on one HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct H2Sender {
    tx: SendRequest<Bytes>,
    /// Set when the connection's task has ended.
    closed: Arc<AtomicBool>,
}

/// The HTTP/2 handshake on `io`; the connection's task is spawned and calls `ended` with how
/// it ended.
pub async fn handshake<T>(
    io: T,
    ended: impl FnOnce(Result<(), h2::Error>) + Send + 'static,
) -> Result<H2Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    // Run after the requests ready in the same turn, so one write carries all their frames
    // (see `after_ready`): each request's task wakes the connection's when it opens a stream.
    tokio::spawn(crate::proxy::hbone::after_ready(async move {
        let result = conn.await;
        flag.store(true, Ordering::Release);
        ended(result);
    }));
    Ok(H2Sender { tx, closed })
}

impl H2Sender {
    /// The connection has ended (or failed): no request can go on it.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (its URI in absolute form, no connection-specific headers: see
    /// `prepare_request`) and waits for the response head. The connection's stream limit
    /// makes this wait for a free stream.
    pub async fn send<B>(&mut self, req: Request<B>) -> Result<Response<UpResp>, h2::Error>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        poll_fn(|cx| self.tx.poll_ready(cx)).await?;
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        let eos = body.is_end_stream();
        // As hyper does: a body of known length says so, unless the header is there already.
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || payload_expected(head.method()))
            && !head.headers().contains_key(header::CONTENT_LENGTH)
        {
            head.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        }
        let (response, stream) = self.tx.send_request(head, eos)?;
        // Until the response head is here, dropping this future resets the stream (and
        // stops the body's pipe); after, the body goes on by itself.
        let cancel = (!eos).then(|| {
            let (cancel, cancelled) = oneshot::channel();
            tokio::spawn(pipe(body, stream, cancelled));
            CancelOnDrop(Some(cancel))
        });
        let resp = response.await?;
        if let Some(mut c) = cancel {
            c.disarm();
        }
        Ok(resp.map(|recv| {
            let length = recv.is_end_stream().then_some(0);
            UpResp::H2(H2Body {
                recv,
                length,
                data_done: false,
            })
        }))
    }
}

/// Methods whose requests carry a body by definition: a zero length is still said.
fn payload_expected(m: &Method) -> bool {
    matches!(*m, Method::POST | Method::PUT | Method::PATCH)
}

/// Tells the body's pipe to reset the stream when dropped armed.
struct CancelOnDrop(Option<oneshot::Sender<()>>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        // Dropped without a value: the pipe stops watching.
        self.0.take();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = c.send(());
        }
    }
}

/// Why a request body's pipe stopped early.
#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("the request was abandoned before its response")]
    Cancelled,
    #[error("the upstream reset the stream: {0}")]
    Reset(Reason),
    #[error("reading the client's body failed: {0}")]
    Body(BoxError),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// Streams `body` into `tx` within the stream's flow-control window.
async fn pipe<B>(mut body: B, mut tx: SendStream<Bytes>, cancelled: oneshot::Receiver<()>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if let Err(e) = pipe_inner(&mut body, &mut tx, cancelled).await {
        debug!(error = %e, "request body to the shared upstream connection stopped");
        let reason = match e {
            PipeError::Cancelled | PipeError::Reset(_) => Reason::CANCEL,
            PipeError::Body(_) | PipeError::H2(_) => Reason::INTERNAL_ERROR,
        };
        tx.send_reset(reason);
    }
}

async fn pipe_inner<B>(
    body: &mut B,
    tx: &mut SendStream<Bytes>,
    mut cancelled: oneshot::Receiver<()>,
) -> Result<(), PipeError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut watching = true;
    loop {
        // The next frame of the body, unless the upstream reset the stream or the request
        // was abandoned meanwhile.
        let frame = poll_fn(|cx| {
            if watching {
                match Pin::new(&mut cancelled).poll(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Err(PipeError::Cancelled)),
                    Poll::Ready(Err(_)) => watching = false,
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(r) = tx.poll_reset(cx) {
                return Poll::Ready(Err(r.map_or_else(PipeError::H2, PipeError::Reset)));
            }
            // The body's error is boxed at once: it must not be held across an await (the
            // pipe is a task of its own, so its future is `Send`).
            Pin::new(&mut *body)
                .poll_frame(cx)
                .map(|f| Ok(f.map(|r| r.map_err(Into::<BoxError>::into))))
        })
        .await?;
        let frame = match frame {
            None => {
                tx.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => return Err(PipeError::Body(e)),
            Some(Ok(f)) => f,
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.send_trailers(trailers)?;
                    return Ok(());
                }
                continue;
            }
        };
        let last = body.is_end_stream();
        if data.is_empty() {
            if last {
                tx.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            continue;
        }
        while data.has_remaining() {
            tx.reserve_capacity(data.len());
            let room = loop {
                match tx.capacity() {
                    0 => match poll_fn(|cx| tx.poll_capacity(cx)).await {
                        Some(r) => {
                            r?;
                        }
                        None => {
                            let reason = poll_fn(|cx| tx.poll_reset(cx)).await?;
                            return Err(PipeError::Reset(reason));
                        }
                    },
                    n => break n,
                }
            };
            let chunk = data.split_to(room.min(data.len()));
            tx.send_data(chunk, last && data.is_empty())?;
        }
        if last {
            return Ok(());
        }
    }
}

/// A response body from an upstream connection.
pub enum UpResp {
    /// From a connection hyper's client drives.
    Hyper(hyper::body::Incoming),
    /// From a shared HTTP/2 connection.
    H2(H2Body),
}

/// A response's body as `h2` receives it; the window each chunk held goes back to the peer
/// as the chunk is passed on.
pub struct H2Body {
    recv: RecvStream,
    /// The bytes left when known to be none.
    length: Option<u64>,
    data_done: bool,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only when the stream is gone, which the next poll reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Body for UpResp {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpResp::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpResp::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpResp::Hyper(b) => b.is_end_stream(),
            UpResp::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpResp::Hyper(b) => b.size_hint(),
            UpResp::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::SinkExt;
    use futures::channel::mpsc;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::HeaderMap;

    type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;
    /// A request body fed frame by frame through [`Frames`].
    type Streaming = StreamBody<mpsc::Receiver<Result<Frame<Bytes>, BoxError>>>;

    /// A client on one end of an in-memory pipe and the server's `h2` connection on the
    /// other, with small windows so that bodies wait for flow control.
    async fn pair() -> (
        H2Sender,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            h2::server::Builder::new()
                .initial_window_size(1024)
                .handshake::<_, Bytes>(b)
                .await
                .expect("server handshake")
        });
        let client = handshake(a, |_| {}).await.expect("client handshake");
        (client, server.await.expect("server task"))
    }

    fn streaming() -> (Frames, Streaming) {
        let (tx, rx) = mpsc::channel(4);
        (tx, StreamBody::new(rx))
    }

    fn trailers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(name, header::HeaderValue::from_static(value));
        t
    }

    #[tokio::test]
    async fn bodies_and_trailers_stream_both_ways() {
        let (mut client, mut server) = pair().await;
        let served = tokio::spawn(async move {
            let (req, mut respond) = server.accept().await.expect("a stream").expect("no error");
            // The connection makes progress only while polled.
            tokio::spawn(
                async move { futures::future::poll_fn(|cx| server.poll_closed(cx)).await },
            );
            let (head, mut body) = req.into_parts();
            assert_eq!(head.uri, "http://pod:80/echo");
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("request data");
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            let req_trailers = body.trailers().await.expect("trailers").expect("some");
            assert_eq!(
                req_trailers.get("x-end").map(|v| v.as_bytes()),
                Some(&b"yes"[..])
            );
            let mut send = respond
                .send_response(Response::new(()), false)
                .expect("response head");
            send.send_data(Bytes::from(got), false).expect("echo");
            send.send_trailers(trailers("grpc-status", "0"))
                .expect("response trailers");
        });
        let (mut frames, body) = streaming();
        let request = Request::builder()
            .method(Method::POST)
            .uri("http://pod:80/echo")
            .body(body)
            .expect("request");
        let sent = tokio::spawn(async move { client.send(request).await });
        // More than the server's 1 KiB window: the pipe waits for it to open.
        let big = Bytes::from(vec![7u8; 5000]);
        frames
            .send(Ok(Frame::data(big.clone())))
            .await
            .expect("data");
        frames
            .send(Ok(Frame::trailers(trailers("x-end", "yes"))))
            .await
            .expect("trailers");
        drop(frames);
        let resp = sent.await.expect("task").expect("response");
        let collected = resp.into_body().collect().await.expect("response body");
        assert_eq!(
            collected.trailers().and_then(|t| t.get("grpc-status")),
            Some(&header::HeaderValue::from_static("0"))
        );
        assert_eq!(collected.to_bytes(), big);
        served
            .await
            .expect("the server saw the body and its trailers");
    }

    #[tokio::test]
    async fn a_known_length_is_sent_and_an_empty_body_ends_with_the_head() {
        let (mut client, mut server) = pair().await;
        let served = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (req, mut respond) =
                    server.accept().await.expect("a stream").expect("no error");
                heads.push((
                    req.headers().get(header::CONTENT_LENGTH).cloned(),
                    req.body().is_end_stream(),
                ));
                respond
                    .send_response(Response::new(()), true)
                    .expect("response");
            }
            tokio::spawn(
                async move { futures::future::poll_fn(|cx| server.poll_closed(cx)).await },
            );
            heads
        });
        let post = Request::post("http://pod:80/")
            .body(http_body_util::Full::new(Bytes::from_static(b"abc")))
            .expect("request");
        let resp = client.send(post).await.expect("response");
        assert!(resp.body().is_end_stream());
        let get = Request::get("http://pod:80/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        client.send(get).await.expect("response");
        let heads = served.await.expect("server");
        assert_eq!(heads[0].0, Some(header::HeaderValue::from(3u64)));
        assert!(!heads[0].1, "the body follows the head");
        assert_eq!(heads[1], (None, true), "a bodiless GET is the head alone");
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_response_resets_the_stream() {
        let (mut client, mut server) = pair().await;
        let (frames, body) = streaming();
        let request = Request::post("http://pod:80/").body(body).expect("request");
        let sending = tokio::spawn(async move { client.send(request).await.map(|_| ()) });
        let (req, _respond) = server.accept().await.expect("a stream").expect("no error");
        tokio::spawn(async move { futures::future::poll_fn(|cx| server.poll_closed(cx)).await });
        sending.abort();
        let _ = sending.await;
        let mut body = req.into_body();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), body.data())
            .await
            .expect("the server hears of it");
        let reason = end.and_then(Result::err).and_then(|e| e.reason());
        assert_eq!(reason, Some(Reason::CANCEL), "the stream was reset");
        drop(frames);
    }

    #[tokio::test]
    async fn the_sender_is_closed_when_the_connection_ends() {
        let (client, server) = pair().await;
        assert!(!client.is_closed());
        drop(server);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !client.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("closed within 5 s");
        let mut client = client;
        let get = Request::get("http://pod:80/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        assert!(client.send(get).await.is_err(), "no request goes on it");
    }
}
