//! Bodies that count their bytes, and the response body that records the request (metrics
//! and access log) when it ends: the duration Istio reports runs to the last byte.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, SizeHint};

use crate::proxy::LogEntry;
use crate::telemetry::access_log::{AccessLog, HttpInfo};
use crate::telemetry::metrics::{HttpLabels, Metrics, RequestDone, ResponseFlags};
use crate::telemetry::trace;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the agent answers clients with: the upstream's body or its own.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Set in a [`Counted`] counter when the body failed (a downstream protocol error, such as
/// invalid chunking); the other bits count bytes. One atomic for both: no second allocation.
const FAILED: u64 = 1 << 63;

/// The bytes a [`Counted`] counter saw.
pub fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed) & !FAILED
}

/// Whether the body behind a [`Counted`] counter failed.
pub fn failed(counter: &AtomicU64) -> bool {
    counter.load(Ordering::Relaxed) & FAILED != 0
}

/// A body passed through unchanged, its data bytes counted.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B) -> Self {
        Counted {
            inner,
            bytes: Arc::default(),
        }
    }

    /// The running count, readable after the body is gone.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    use bytes::Buf;
                    self.bytes
                        .fetch_add(d.remaining() as u64, Ordering::Relaxed);
                }
            }
            Some(Err(_)) => {
                self.bytes.fetch_or(FAILED, Ordering::Relaxed);
            }
            None => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What recording a finished request needs.
pub struct OnEnd {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub labels: HttpLabels,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// The access log entry (when on), the request's details, and where it went.
    pub log: Option<(LogEntry, Option<HttpInfo>, std::net::SocketAddrV4)>,
    /// The request's span and where it goes, when it is sampled.
    pub trace: Option<(Box<trace::Started>, trace::Spans)>,
    /// The connection's `/connections` entry.
    pub listed: Arc<crate::proxy::connections::ConnInfo>,
}

impl OnEnd {
    fn finish(mut self, response_bytes: u64, complete: bool, grpc_status: Option<u16>) {
        if !complete && self.labels.conn.flags == ResponseFlags::None {
            self.labels.conn.flags = ResponseFlags::DownstreamConnectionTermination;
        }
        if grpc_status.is_some() {
            self.labels.grpc_status = grpc_status;
        }
        let request_bytes = count(&self.request_bytes);
        let done = RequestDone {
            labels: &self.labels,
            duration: self.started.elapsed(),
            request_bytes,
            response_bytes,
        };
        let c = &self.listed;
        self.metrics.request(&done, &c.last_series);
        c.progress
            .received
            .fetch_add(request_bytes, Ordering::Relaxed);
        c.progress.sent.fetch_add(response_bytes, Ordering::Relaxed);
        if let Some((span, spans)) = self.trace.take() {
            spans.record((*span).finish(&self.labels, request_bytes, response_bytes));
        }
        if let Some((entry, info, upstream)) = self.log {
            let mut info = info.unwrap_or_default();
            info.response_code = self.labels.response_code;
            entry.finish(
                &self.access_log,
                crate::proxy::Ended {
                    labels: &self.labels.conn,
                    received: request_bytes,
                    sent: response_bytes,
                    upstream_host: Some(upstream.into()),
                    upstream_local: None,
                    failure: info.failure.clone(),
                    http: Some(Box::new(info)),
                },
            );
        }
    }
}

/// The response body: counted, and recorded once at its end (or when the client drops it).
struct Recorded<B> {
    inner: B,
    bytes: u64,
    grpc_status: Option<u16>,
    on_end: Option<OnEnd>,
    /// The route's timeout, when it has one: past it the body fails (`UT`), as Envoy resets a
    /// response still streaming when the route's timeout expires.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The error a response body ends with when the route's timeout expires during it.
#[derive(Debug, thiserror::Error)]
#[error("upstream response timeout (the route's timeout expired before the last byte)")]
pub struct ResponseTimeout;

impl<B> Recorded<B> {
    fn end(&mut self, complete: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end.finish(self.bytes, complete, self.grpc_status);
        }
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl<B> Body for Recorded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            if let Some(on_end) = self.on_end.as_mut() {
                on_end.labels.conn.flags = ResponseFlags::UpstreamRequestTimeout;
            }
            self.end(false);
            return Poll::Ready(Some(Err(Box::new(ResponseTimeout))));
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if let Some(t) = f.trailers_ref() {
                    self.grpc_status = super::grpc_status(t);
                }
                // The server stops polling once the body says it has ended.
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Some(Err(_)) => self.end(false),
            None => self.end(true),
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a response body so the request is recorded when it ends.
pub fn response<B>(body: B, on_end: OnEnd) -> ProxyBody
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    response_until(body, on_end, None)
}

/// [`response`] that fails with [`ResponseTimeout`] (flag `UT`) if the body has not ended by
/// `deadline`.
pub fn response_until<B>(body: B, on_end: OnEnd, deadline: Option<Instant>) -> ProxyBody
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut recorded = Recorded {
        inner: body,
        bytes: 0,
        grpc_status: None,
        on_end: Some(on_end),
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
    };
    // An empty body (a 204, or a HEAD) may never be polled: record it now.
    if recorded.inner.is_end_stream() {
        recorded.end(true);
    }
    recorded.boxed_unsync()
}
