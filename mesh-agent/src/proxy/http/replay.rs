//! Keeping a request's body for a retry. The body streams to the first upstream as it
//! arrives (a gRPC stream or a slow upload is never held back); a [`Tee`] keeps a copy of
//! its frames (clones of the same `Bytes`, no copying) up to [`RETRY_BUFFER`]. A retry sends
//! the copy only if the body was seen to its end within the limit: a longer body, one with
//! trailers, or one still arriving when the try failed is sent once, as before.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The most of a request body kept for a retry. Envoy keeps up to its buffer limit (1 MiB by
/// default); this is per request in flight, so it is kept smaller.
pub const RETRY_BUFFER: usize = 64 * 1024;

/// What a [`Tee`] kept of a body.
#[derive(Debug, Default)]
pub struct Recording {
    chunks: Vec<Bytes>,
    len: usize,
    /// The body ended (within the limit).
    complete: bool,
    /// Over the limit, trailers, or an error: cannot be replayed.
    spoiled: bool,
}

impl Recording {
    fn data(&mut self, d: &Bytes) {
        if self.spoiled {
            return;
        }
        if self.len + d.len() > RETRY_BUFFER {
            self.spoil();
        } else {
            self.len += d.len();
            self.chunks.push(d.clone());
        }
    }

    fn spoil(&mut self) {
        self.spoiled = true;
        self.chunks = Vec::new();
    }

    /// The whole body, if it was seen to its end within the limit.
    pub fn replay(&self) -> Option<Bytes> {
        if !self.complete || self.spoiled {
            return None;
        }
        Some(match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut all = BytesMut::with_capacity(self.len);
                for c in many {
                    all.extend_from_slice(c);
                }
                all.freeze()
            }
        })
    }
}

/// A shared recording: written by the body's frames as hyper sends them, read by the retry
/// loop after the try. Both belong to one request; the lock is never contended across
/// connections.
pub type Shared = Arc<Mutex<Recording>>;

pub fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Recording> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's body on its way upstream, recorded into `recording` if there is one.
#[derive(Debug)]
pub struct Tee {
    inner: Incoming,
    recording: Option<Shared>,
}

impl Tee {
    pub fn new(inner: Incoming, recording: Option<Shared>) -> Self {
        Tee { inner, recording }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(rec) = &self.recording {
            let mut rec = lock(rec);
            match &frame {
                Some(Ok(f)) => match f.data_ref() {
                    Some(d) => rec.data(d),
                    None => rec.spoil(),
                },
                Some(Err(_)) => rec.spoil(),
                None => rec.complete = true,
            }
            // hyper stops polling once the body says it ended (a Content-Length reached).
            if self.inner.is_end_stream() {
                rec.complete = true;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_only_a_whole_body_within_the_limit() {
        let mut r = Recording::default();
        r.data(&Bytes::from_static(b"hello "));
        assert_eq!(r.replay(), None, "not ended yet");
        r.data(&Bytes::from_static(b"world"));
        r.complete = true;
        assert_eq!(r.replay().as_deref(), Some(&b"hello world"[..]));

        let mut big = Recording::default();
        big.data(&Bytes::from(vec![0u8; RETRY_BUFFER]));
        big.data(&Bytes::from_static(b"x"));
        big.complete = true;
        assert_eq!(big.replay(), None);
        assert!(big.chunks.is_empty(), "nothing kept once over the limit");

        let mut trailers = Recording::default();
        trailers.data(&Bytes::from_static(b"x"));
        trailers.spoil();
        trailers.complete = true;
        assert_eq!(trailers.replay(), None);
    }
}
