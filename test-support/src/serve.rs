//! The parts both stand-ins share: the loopback server and the playing of a
//! scripted streaming reply with its faults.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::script::{
    Fault, RecordedCall, Script, ScriptedUsage, Scripts, Stop, StreamCounts, StreamEnd,
    StreamFailure,
};

/// A running loopback HTTP server; dropping it shuts the server down.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Server {
    /// Serves `router` on 127.0.0.1 at a free port until `shutdown` is
    /// cancelled or the returned handle is dropped.
    pub(crate) async fn start(router: Router, shutdown: CancellationToken) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let until = shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            // A failing accept loop ends the server; the tests then see
            // connection errors, which name the problem well enough.
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(until)
                .await;
        });
        Ok(Self {
            addr,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
        })
    }
}

/// The handle both stand-ins share: their server and their scripts. The
/// stand-ins dereference to it for scripting and observing calls.
pub struct StandIn {
    pub(crate) server: Server,
    pub(crate) scripts: Scripts,
}

impl StandIn {
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Stops the server; stalled streams end.
    pub fn shutdown(&self) {
        self.server.shutdown.cancel();
    }

    /// Answers every call to `model` with `script` (after queued ones).
    pub fn set_script(&self, model: &str, script: Script) {
        self.scripts.set(model, script);
    }

    /// Answers the next call to `model` with `script`, once.
    pub fn push_script(&self, model: &str, script: Script) {
        self.scripts.push(model, script);
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.scripts.calls()
    }

    pub fn stream_counts(&self) -> StreamCounts {
        self.scripts.stream_counts()
    }

    /// Waits until at least `n` streams were left by their clients before
    /// their end.
    pub async fn wait_for_dropped_streams(&self, n: usize) {
        self.scripts
            .wait_for_streams(|c| c.dropped_by_client >= n)
            .await;
    }

    /// Waits until at least `n` streams ran to their scripted end.
    pub async fn wait_for_finished_streams(&self, n: usize) {
        self.scripts.wait_for_streams(|c| c.finished >= n).await;
    }
}

/// How one protocol writes the pieces of a streamed reply.
pub(crate) trait WireFormat: Send + 'static {
    fn opening(&self) -> io::Result<Vec<Bytes>>;
    fn delta(&self, text: &str) -> io::Result<Bytes>;
    fn ending(&self, stop: Stop, usage: ScriptedUsage, elapsed: Duration)
    -> io::Result<Vec<Bytes>>;
    fn stream_error(&self, failure: StreamFailure) -> io::Result<Bytes>;
}

/// What a streamed reply plays: the deltas before the fault, then the fault or
/// the normal ending.
pub(crate) struct Performance {
    pub(crate) deltas: Vec<String>,
    pub(crate) delta_delay: Duration,
    pub(crate) stop: Stop,
    pub(crate) usage: ScriptedUsage,
    pub(crate) fault: Option<Fault>,
}

impl Performance {
    pub(crate) fn new(script: Script, request_words: u32) -> Self {
        Self {
            deltas: script.deltas_before_fault().to_vec(),
            delta_delay: script.delta_delay,
            stop: script.stop,
            usage: script.usage_for(request_words),
            fault: script.fault,
        }
    }
}

type Frame = Result<Bytes, io::Error>;

/// A response body that plays `performance` in `format`, counting the stream
/// in `scripts` and noticing a client that leaves early.
pub(crate) fn streamed_body<F: WireFormat>(
    performance: Performance,
    format: F,
    scripts: Scripts,
    shutdown: CancellationToken,
) -> Body {
    // Capacity 1: the producer runs at most one frame ahead of the socket, so
    // a client that leaves is noticed at the next frame.
    let (tx, rx) = mpsc::channel::<Frame>(1);
    scripts.stream_started();
    tokio::spawn(async move {
        let end = tokio::select! {
            end = play(performance, format, &tx) => end,
            () = shutdown.cancelled() => StreamEnd::Finished,
        };
        scripts.stream_ended(end);
    });
    Body::from_stream(ReceiverStream::new(rx))
}

/// The client went away (the response body was dropped).
struct ClientGone;

async fn send(tx: &mpsc::Sender<Frame>, frame: Frame) -> Result<(), ClientGone> {
    tx.send(frame).await.map_err(|_| ClientGone)
}

async fn send_all(
    tx: &mpsc::Sender<Frame>,
    frames: io::Result<Vec<Bytes>>,
) -> Result<(), ClientGone> {
    match frames {
        Ok(frames) => {
            for frame in frames {
                send(tx, Ok(frame)).await?;
            }
            Ok(())
        }
        Err(error) => send(tx, Err(error)).await,
    }
}

async fn pause(tx: &mpsc::Sender<Frame>, delay: Duration) -> Result<(), ClientGone> {
    if delay.is_zero() {
        return Ok(());
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        () = tx.closed() => Err(ClientGone),
    }
}

async fn play<F: WireFormat>(
    performance: Performance,
    format: F,
    tx: &mpsc::Sender<Frame>,
) -> StreamEnd {
    match play_until_gone(performance, format, tx).await {
        Ok(end) => end,
        Err(ClientGone) => StreamEnd::DroppedByClient,
    }
}

async fn play_until_gone<F: WireFormat>(
    performance: Performance,
    format: F,
    tx: &mpsc::Sender<Frame>,
) -> Result<StreamEnd, ClientGone> {
    let started = Instant::now();
    send_all(tx, format.opening()).await?;
    for delta in &performance.deltas {
        pause(tx, performance.delta_delay).await?;
        send(tx, format.delta(delta)).await?;
    }
    match performance.fault {
        None | Some(Fault::Reject(_)) => {
            let ending = format.ending(performance.stop, performance.usage, started.elapsed());
            send_all(tx, ending).await?;
        }
        Some(Fault::StreamError { failure, .. }) => send(tx, format.stream_error(failure)).await?,
        Some(Fault::Stall { .. }) => {
            // Keep the connection open and silent until the client leaves
            // (or the server shuts down, which cancels this whole task).
            tx.closed().await;
            return Err(ClientGone);
        }
        Some(Fault::Disconnect { .. }) => {
            let abort = io::Error::new(io::ErrorKind::ConnectionAborted, "scripted disconnect");
            send(tx, Err(abort)).await?;
        }
    }
    Ok(StreamEnd::Finished)
}
