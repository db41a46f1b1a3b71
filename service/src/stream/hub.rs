//! The in-process stream hub: one entry per in-flight reply, keyed by chat
//! session, holding the reply's frames (the replay buffer) and waking every
//! subscriber when one is appended.
//!
//! Only the reply's generation task appends, so event ids are assigned
//! without coordination. Locks guard plain memory and are never held across
//! an await; subscribers copy `Bytes` handles (reference counts), never the
//! frames themselves.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::frames::PING;
use crate::error::Error;
use crate::store::ObjectId;

/// Every in-flight (and just finished) reply of this process.
#[derive(Default)]
pub struct Hub {
    replies: Mutex<HashMap<ObjectId, Arc<ReplyStream>>>,
}

impl Hub {
    /// Registers a new reply for `session`; `ReplyInProgress` while another
    /// one is still generating.
    pub fn begin(
        &self,
        session: ObjectId,
        owner: &str,
        grace: Duration,
    ) -> Result<Arc<ReplyStream>, Error> {
        let mut replies = lock(&self.replies);
        if replies
            .get(&session)
            .is_some_and(|reply| !reply.is_finished())
        {
            return Err(Error::ReplyInProgress);
        }
        let reply = Arc::new(ReplyStream::new(owner.to_owned(), grace));
        replies.insert(session, Arc::clone(&reply));
        Ok(reply)
    }

    /// Takes back a reply that never started (its hold was refused), so the
    /// session is free again at once.
    pub fn withdraw(&self, session: ObjectId, reply: &Arc<ReplyStream>) {
        reply.finish();
        let mut replies = lock(&self.replies);
        if replies
            .get(&session)
            .is_some_and(|current| Arc::ptr_eq(current, reply))
        {
            replies.remove(&session);
        }
    }

    /// The session's current or just finished reply.
    pub fn get(&self, session: ObjectId) -> Option<Arc<ReplyStream>> {
        lock(&self.replies).get(&session).cloned()
    }

    /// Forgets a finished reply after `linger`, so a client that lost its
    /// connection just before the end can still fetch the last events.
    pub fn retire(self: &Arc<Self>, session: ObjectId, reply: &Arc<ReplyStream>, linger: Duration) {
        let hub = Arc::clone(self);
        let reply = Arc::clone(reply);
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let mut replies = lock(&hub.replies);
            if replies
                .get(&session)
                .is_some_and(|current| Arc::ptr_eq(current, &reply))
            {
                replies.remove(&session);
            }
        });
    }

    /// Replies currently generating.
    pub fn active(&self) -> usize {
        lock(&self.replies)
            .values()
            .filter(|reply| !reply.is_finished())
            .count()
    }
}

/// One reply's events and its subscribers' bookkeeping.
pub struct ReplyStream {
    /// The user whose reply this is (re-attach is for the owner only).
    pub owner: String,
    log: Mutex<Log>,
    appended: Notify,
    /// Cancelled when the last event has been appended.
    finished: CancellationToken,
    /// Cancelled when no owner connection came back within the grace period.
    abandoned: CancellationToken,
    attached: AtomicUsize,
    /// Bumped on every detach, so an older grace timer cannot cancel a
    /// reply whose owner re-attached and left again later.
    detaches: AtomicU64,
    grace: Duration,
}

#[derive(Default)]
struct Log {
    frames: Vec<Bytes>,
}

impl ReplyStream {
    fn new(owner: String, grace: Duration) -> Self {
        Self {
            owner,
            log: Mutex::new(Log::default()),
            appended: Notify::new(),
            finished: CancellationToken::new(),
            abandoned: CancellationToken::new(),
            attached: AtomicUsize::new(0),
            detaches: AtomicU64::new(0),
            grace,
        }
    }

    /// Appends the next frame (only the generation task calls this).
    pub fn publish(&self, frame: Bytes) {
        lock(&self.log).frames.push(frame);
        self.appended.notify_waiters();
    }

    /// No more frames will come; subscribers end after the last one.
    pub fn finish(&self) {
        self.finished.cancel();
        self.appended.notify_waiters();
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_cancelled()
    }

    /// Resolves when the owner has been gone for the whole grace period, or
    /// stopped the reply.
    pub async fn abandoned(&self) {
        self.abandoned.cancelled().await;
    }

    /// The owner stops the reply: it ends as if abandoned, at once (what was
    /// generated is kept and charged).
    pub fn stop(&self) {
        self.abandoned.cancel();
    }

    /// Resolves once the last event has been appended (the reply is stored).
    pub async fn finished(&self) {
        self.finished.cancelled().await;
    }

    /// The frames after event `after` (0: all), then every later one as it
    /// is appended, with `: ping` comments while idle. An `owner`
    /// subscription counts as attached: when the last one ends before the
    /// reply does, the grace period starts.
    pub fn subscribe(
        self: &Arc<Self>,
        after: u64,
        owner: bool,
        ping: Duration,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        let attachment = owner.then(|| Attachment::new(Arc::clone(self)));
        let subscriber = Subscriber {
            reply: Arc::clone(self),
            next: usize::try_from(after).unwrap_or(usize::MAX),
            pending: VecDeque::new(),
            ping: tokio::time::interval_at(tokio::time::Instant::now() + ping, ping),
            _attachment: attachment,
        };
        futures::stream::unfold(subscriber, |mut subscriber| async move {
            subscriber
                .next_frame()
                .await
                .map(|frame| (Ok(frame), subscriber))
        })
    }

    /// Copies the handles of frames from `next` on into `into`; whether the
    /// reply had finished when they were read.
    fn read_from(&self, next: &mut usize, into: &mut VecDeque<Bytes>) -> bool {
        // Read `finished` before the frames: a reply that finished has
        // appended everything, so no frame can be missed.
        let finished = self.is_finished();
        let log = lock(&self.log);
        let start = (*next).min(log.frames.len());
        into.extend(log.frames[start..].iter().cloned());
        *next = log.frames.len();
        finished
    }

    fn detached(self: &Arc<Self>) {
        if self.attached.fetch_sub(1, Ordering::AcqRel) != 1 || self.is_finished() {
            return;
        }
        let detach = self.detaches.fetch_add(1, Ordering::AcqRel) + 1;
        let reply = Arc::clone(self);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime means the process is ending; nothing to keep alive.
            self.abandoned.cancel();
            return;
        };
        runtime.spawn(async move {
            tokio::select! {
                () = reply.finished.cancelled() => {}
                () = tokio::time::sleep(reply.grace) => {
                    if reply.attached.load(Ordering::Acquire) == 0
                        && reply.detaches.load(Ordering::Acquire) == detach
                    {
                        reply.abandoned.cancel();
                    }
                }
            }
        });
    }
}

/// An owner connection; dropping it (the client went away) detaches.
struct Attachment(Arc<ReplyStream>);

impl Attachment {
    fn new(reply: Arc<ReplyStream>) -> Self {
        reply.attached.fetch_add(1, Ordering::AcqRel);
        Self(reply)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.detached();
    }
}

struct Subscriber {
    reply: Arc<ReplyStream>,
    next: usize,
    pending: VecDeque<Bytes>,
    ping: tokio::time::Interval,
    _attachment: Option<Attachment>,
}

impl Subscriber {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            let appended = self.reply.appended.notified();
            tokio::pin!(appended);
            // Registered before reading, so an append between the read and
            // the wait still wakes us.
            appended.as_mut().enable();
            let finished = self.reply.read_from(&mut self.next, &mut self.pending);
            if !self.pending.is_empty() {
                continue;
            }
            if finished {
                return None;
            }
            tokio::select! {
                () = &mut appended => {}
                _ = self.ping.tick() => return Some(Bytes::from_static(PING)),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked (every
    // critical section is a single push, insert or copy).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn replay_after_an_id_has_no_gap_and_no_duplicate() {
        let hub = Hub::default();
        let session = ObjectId::new();
        let reply = hub.begin(session, "alice", LONG).unwrap();
        assert!(matches!(
            hub.begin(session, "alice", LONG),
            Err(Error::ReplyInProgress)
        ));
        for id in 1..=3 {
            reply.publish(Bytes::from(format!("{id}")));
        }
        let late = reply.subscribe(2, false, LONG);
        reply.publish(Bytes::from_static(b"4"));
        reply.finish();
        let frames: Vec<_> = late.map(Result::unwrap).collect().await;
        assert_eq!(frames, [Bytes::from_static(b"3"), Bytes::from_static(b"4")]);
        // A finished reply no longer blocks a new one.
        assert!(hub.begin(session, "alice", LONG).is_ok());
    }

    #[tokio::test]
    async fn a_reattached_owner_keeps_the_reply_alive() {
        let grace = Duration::from_millis(100);
        let reply = Arc::new(ReplyStream::new("alice".into(), grace));
        let first = reply.subscribe(0, true, LONG);
        drop(first);
        let second = reply.subscribe(0, true, LONG);
        // Proving that something does not happen takes time: several grace
        // periods pass with the owner attached and the reply goes on.
        let kept = tokio::time::timeout(grace * 4, reply.abandoned()).await;
        assert!(kept.is_err(), "abandoned while the owner was attached");
        drop(second);
        let started = tokio::time::Instant::now();
        reply.abandoned().await;
        assert!(started.elapsed() >= grace);
    }
}
