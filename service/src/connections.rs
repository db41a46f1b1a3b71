//! HTTP/1 connections, with the limits `axum::serve` lacks: a deadline for
//! each request's line and headers, one for the wait between kept-alive
//! requests, one for reading a request body, and a bound on header bytes.
//! Responses in progress (streams lasting minutes) have no deadline.
//!
//! hyper's own header timeout starts when a kept-alive connection goes idle,
//! so it cannot tell a slow request (cut soon) from a quiet keep-alive (kept
//! longer than the load balancer's idle timeout); [`ConnectionClock`] does.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Request, Response};
use futures::{FutureExt, TryFutureExt};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Config;

/// hyper's smallest read buffer.
const MIN_BUFFER_BYTES: usize = 8 * 1024;
/// After an accept error other than a refused or reset connection (most
/// likely out of file descriptors), wait before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From accept (or a kept-alive request's first byte) to complete headers.
    pub header_read_timeout: Duration,
    /// A kept-alive connection's wait for its next request.
    pub idle_timeout: Duration,
    /// From complete headers to the end of the request body.
    pub body_read_timeout: Duration,
    /// Request line plus headers.
    pub max_header_bytes: usize,
}

impl ConnectionLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
            idle_timeout: Duration::from_secs(config.idle_connection_timeout_seconds),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
            max_header_bytes: config.max_header_bytes,
        }
    }
}

/// A request body that did not arrive whole within the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs())]
pub struct BodyReadTimedOut(pub Duration);

impl BodyReadTimedOut {
    /// The timeout, when `error` or one of its sources is this error.
    pub fn find(error: &(dyn StdError + 'static)) -> Option<Duration> {
        let mut current = Some(error);
        while let Some(error) = current {
            if let Some(timed_out) = error.downcast_ref::<Self>() {
                return Some(timed_out.0);
            }
            current = error.source();
        }
        None
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets every open connection finish its request in progress,
/// and returns once they are all closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                spawn_connection(stream, app.clone(), limits, &connections, &shutdown);
            }
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                tracing::error!(%error, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

fn spawn_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    connections: &TaskTracker,
    shutdown: &CancellationToken,
) {
    // Small SSE writes must leave at once, not wait for Nagle's algorithm.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::warn!(%error, "setting TCP_NODELAY failed");
    }
    let clock = Arc::new(ConnectionClock::new(limits));
    let io = TokioIo::new(ClockedStream::new(stream, Arc::clone(&clock)));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        clock.request_started();
        let request = request.map(|body| DeadlineBody::new(body, limits.body_read_timeout));
        let finished = ResponseFinished(Arc::clone(&clock));
        // Boxed here, so that hyper's own box for the request in flight,
        // kept for the connection's life, holds a pointer: the router's
        // future (about 300 bytes) is freed once the response head is out,
        // not kept by every open stream.
        app.clone()
            .oneshot(request)
            .map_ok(move |response: Response<Body>| {
                response.map(|body| ResponseBody {
                    body,
                    _finished: finished,
                })
            })
            .boxed()
    });
    let connection = http1::Builder::new()
        // Replaced by the ConnectionClock (no timer is set for hyper's own).
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        // A request whose headers never end is refused at this size too.
        .max_buf_size(limits.max_header_bytes.max(MIN_BUFFER_BYTES))
        .serve_connection(io, service);
    // A combinator, not an `async move` block: the block would keep the
    // moved-in connection beside the one it awaits, twice its size, in
    // every connection's task.
    let served = Served {
        connection,
        shutdown: shutdown.clone().cancelled_owned(),
        cancelled: shutdown.clone(),
        state: Shutdown::NotWaiting,
    };
    connections.spawn(served.map(|closed| {
        if let Err(error) = closed {
            tracing::debug!(%error, "connection closed on an error");
        }
    }));
}

pin_project_lite::pin_project! {
    /// A connection that, once `shutdown` is cancelled, finishes the request
    /// in progress and closes. hyper-util's `GracefulShutdown` does the same
    /// with a watch channel whose wait is 144 bytes; this one's is 72, which
    /// keeps every connection's task in tokio's 896-byte cell, not the
    /// 1,024-byte one.
    struct Served<C> {
        #[pin]
        connection: C,
        #[pin]
        shutdown: WaitForCancellationFutureOwned,
        // The token `shutdown` waits on, read on every later poll.
        cancelled: CancellationToken,
        state: Shutdown,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    /// Not polled yet: the first poll registers the task's waker.
    NotWaiting,
    /// Registered: the wait is not polled again. Polling it takes the
    /// shutdown token's lock, one lock shared by every connection, on every
    /// poll of every connection; its waker, the task's, does not change, so
    /// reading the token's flag is enough.
    Waiting,
    /// The connection was told to close.
    Begun,
}

impl<I, S, B> Future for Served<http1::Connection<I, S>>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let shut_down = match *this.state {
            Shutdown::NotWaiting => {
                *this.state = Shutdown::Waiting;
                this.shutdown.poll(cx).is_ready()
            }
            Shutdown::Waiting => this.cancelled.is_cancelled(),
            Shutdown::Begun => false,
        };
        if shut_down {
            *this.state = Shutdown::Begun;
            this.connection.as_mut().graceful_shutdown();
        }
        this.connection.poll(cx)
    }
}

/// What a connection waits for, and until when.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// A request's line and headers.
    Head { deadline: Instant },
    /// The first byte of a kept-alive connection's next request.
    Idle { deadline: Instant },
    /// Nothing: a request is being answered.
    Busy,
}

struct ConnectionClock {
    limits: ConnectionLimits,
    state: Mutex<ClockState>,
}

struct ClockState {
    wait: Wait,
    /// The connection task, from its last read that found nothing.
    reader: Option<Waker>,
}

impl ConnectionClock {
    fn new(limits: ConnectionLimits) -> Self {
        let wait = Wait::Head {
            deadline: Instant::now() + limits.header_read_timeout,
        };
        Self {
            limits,
            state: Mutex::new(ClockState { wait, reader: None }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        // Every update is one assignment: the state stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_arrived(&self) {
        let mut state = self.state();
        if let Wait::Idle { .. } = state.wait {
            state.wait = Wait::Head {
                deadline: Instant::now() + self.limits.header_read_timeout,
            };
        }
    }

    fn request_started(&self) {
        self.state().wait = Wait::Busy;
    }

    fn response_finished(&self) {
        let reader = {
            let mut state = self.state();
            let Wait::Busy = state.wait else {
                return;
            };
            state.wait = Wait::Idle {
                deadline: Instant::now() + self.limits.idle_timeout,
            };
            state.reader.take()
        };
        // hyper last read while the request was busy, with no deadline to
        // watch; it reads again (and arms the idle deadline) once woken.
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// The deadline of what the connection waits for; `reader` is woken
    /// when a response finishes and a new deadline starts.
    fn deadline(&self, reader: &Waker) -> Option<(Instant, &'static str)> {
        let mut state = self.state();
        match state.wait {
            Wait::Head { deadline } => Some((deadline, "request headers")),
            Wait::Idle { deadline } => Some((deadline, "next request")),
            Wait::Busy => {
                state.reader = Some(reader.clone());
                None
            }
        }
    }
}

/// The client's socket: reads fail with `TimedOut` once the connection's
/// deadline passes while it waits for the client, which makes hyper close it.
struct ClockedStream {
    stream: TcpStream,
    clock: Arc<ConnectionClock>,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
}

impl ClockedStream {
    fn new(stream: TcpStream, clock: Arc<ConnectionClock>) -> Self {
        Self {
            stream,
            clock,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
        }
    }

    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((deadline, waiting_for)) = self.clock.deadline(cx.waker()) else {
            return Poll::Pending;
        };
        if self.armed_for != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client sent no {waiting_for} in time"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ClockedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.clock.bytes_arrived();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl AsyncWrite for ClockedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A request body that fails with [`BodyReadTimedOut`] once its deadline
/// passes before its end.
struct DeadlineBody {
    body: Incoming,
    timeout: Duration,
    deadline: Instant,
    /// Created on the first wait, so bodies read at once (or never) cost no timer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            deadline: Instant::now() + timeout,
            timer: None,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|result| result.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(BodyReadTimedOut(this.timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Tells the clock the response is over when hyper drops its body (after
/// the last byte is written, or when the connection ends).
struct ResponseFinished(Arc<ConnectionClock>);

impl Drop for ResponseFinished {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

/// A response body that marks the end of its response when dropped.
struct ResponseBody {
    body: Body,
    _finished: ResponseFinished,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
