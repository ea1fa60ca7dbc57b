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

/// Drives `fut`, a tunnel connection's task, each time after the tasks that were ready when
/// it was woken.
///
/// A connection's task is woken by every stream that queues a frame. tokio runs a task woken
/// by the running one next (its LIFO slot), so with many streams busy the connection wrote
/// each stream's frame as soon as it was queued: one TLS record and one `writev` per
/// request, each a separate segment for both kernels to carry. Here each wake first puts the
/// task at the back of the run queue (a task that wakes itself is rescheduled as a yield),
/// so the streams ready in the same turn queue their frames first and one write carries
/// them all. With one stream ready it costs one extra poll.
pub async fn after_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut deferred = false;
    std::future::poll_fn(move |cx| {
        if !deferred {
            deferred = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        deferred = false;
        fut.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{mpsc, watch};

    /// What a "connection" task takes from its queue each time it runs, when `streams`
    /// tasks become ready in the same turn and each queues one frame: on a one-worker
    /// multi-thread runtime, as the data path runs.
    async fn batches(streams: usize, deferred: bool) -> Vec<usize> {
        tokio::spawn(async move {
            let (frames, mut queue) = mpsc::unbounded_channel::<usize>();
            let conn = async move {
                let (mut seen, mut got) = (Vec::new(), Vec::new());
                while got.len() < streams {
                    let before = got.len();
                    queue.recv_many(&mut got, streams).await;
                    seen.push(got.len() - before);
                }
                seen
            };
            let conn = if deferred {
                tokio::spawn(after_ready(conn))
            } else {
                tokio::spawn(conn)
            };
            let (go, ready) = watch::channel(false);
            for i in 0..streams {
                let (frames, mut ready) = (frames.clone(), ready.clone());
                tokio::spawn(async move {
                    if ready.wait_for(|go| *go).await.is_ok() {
                        let _ = frames.send(i);
                    }
                });
            }
            // Every task parks on its channel first.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let _ = go.send(true);
            conn.await.expect("connection task")
        })
        .await
        .expect("driver task")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_woken_connection_takes_every_frame_queued_in_the_same_turn() {
        // The premise: run at once, the connection takes the frames one or a few at a time.
        let direct = batches(8, false).await;
        assert!(direct.len() > 1, "{direct:?}");
        assert_eq!(batches(8, true).await, vec![8]);
    }
}
