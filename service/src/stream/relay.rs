//! Replies across replicas, through Redis.
//!
//! A replica generating a reply holds the session's lock (one reply per
//! session across replicas; refreshed as a heartbeat) and writes every event
//! to a Redis Stream of the reply, with the event id as the entry id, so a
//! reader on any replica resumes after a `Last-Event-ID` with no gap and no
//! duplicate. Replies starting and ending are published on a channel every
//! replica relays to its local subscribers, and kept in a hash of replies in
//! flight for consoles that connect later.
//!
//! Keys (under the configured prefix `p`):
//! - `p:session:{id}:reply`   the session's lock: the running reply's id,
//!   expiring when its replica stops renewing it (that replica died);
//! - `p:session:{id}:latest`  the session's newest reply (JSON), kept for the
//!   grace period (at least a minute) after it ends, for re-attaches;
//! - `p:reply:{id}:events`    the reply's events: entries `N-0` {f: frame,
//!   t: produced µs}, then `N-1` {end: outcome}; capped, and expiring the
//!   grace period (at least a minute) after the end;
//! - `p:reply:{id}:owner`     present while the reply's owner follows it on
//!   a replica other than the generating one (keeps it from being abandoned);
//! - `p:reply:{id}:stop`      the owner asked another replica to stop it;
//! - `p:live`                 reply id -> reply (JSON), replies in flight;
//! - channel `p:announcements` replies starting and ending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, RedisError, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frames::{ErrorData, frame};
use super::metrics::HubMetrics;
use super::shared::{Announcement, ReplyInfo, lock};
use crate::error::Error;
use crate::shared_redis::{self, RESPONSE_TIMEOUT};
use crate::store::ObjectId;

/// A reply stream of the hub as the relay handles it: the relay holds the
/// session's lock for the replies generated here (and stops one when another
/// replica asks), and feeds the mirrors of replies generated elsewhere.
pub(super) trait RelayedReply: Send + Sync {
    fn info(&self) -> &Arc<ReplyInfo>;
    /// Ends the reply at once, as its owner's stop does.
    fn stop(&self);
    fn owners_attached(&self) -> usize;
    fn is_finished(&self) -> bool;
    /// Appends an event, produced at `produced` on the generating replica
    /// (`None`: now, read only if something takes the time).
    fn publish_at(&self, id: u64, frame: Bytes, produced: Option<SystemTime>);
}

/// A lock not renewed for this many heartbeats means its replica is gone.
const HEARTBEATS_TO_LOSE: u32 = 5;
/// Events a mirror reads per call, and a writer sends per round trip. A
/// mirror hands a whole batch to its observers at once: well below their
/// queues (`PARLEY_OBSERVER_BUFFER_EVENTS`), so a burst alone cuts nobody.
const BATCH: usize = 128;
/// Outcomes a reply may end with (see `parley_streams_total`).
const OUTCOMES: [&str; 8] = [
    "completed",
    "failed",
    "interrupted",
    "abandoned",
    "shutdown",
    "unpaid",
    "max_duration",
    "lost",
];

/// Deletes a lock only if it still holds this reply.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Renews a lock only if it still holds this reply: 0 when it does not, 1
/// when renewed, 2 when renewed and the reply's owner asked to stop it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
return 1
";

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Prefix of every key (replicas of one deployment share it).
    pub prefix: String,
    /// How often locks are renewed; a reply is lost after
    /// [`HEARTBEATS_TO_LOSE`] missed renewals.
    pub heartbeat: Duration,
    /// Events kept per reply stream.
    pub max_events: usize,
    /// How long a reply's events stay after it ended: the re-attach grace,
    /// and long enough for mirrors still reading to reach the end.
    pub linger: Duration,
    /// Longest a reply may run: its events expire this long after the start
    /// (plus the linger) even if its replica never ends it.
    pub max_duration: Duration,
}

/// A replica's connection to the shared hub.
pub struct Relay {
    client: redis::Client,
    commands: ConnectionManager,
    settings: RelaySettings,
    /// Tells this replica's announcements from others'.
    replica: String,
    /// The locks of the replies this replica generates, renewed each heartbeat.
    held: Mutex<foldhash::HashMap<ObjectId, Held>>,
    metrics: HubMetrics,
    release: Script,
}

/// A reply this replica generates, as its heartbeat sees it.
struct Held {
    reply_id: String,
    reply: Weak<dyn RelayedReply>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AnnouncementMessage {
    replica: String,
    state: AnnouncedState,
    reply: ReplyInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AnnouncedState {
    Started,
    Ended,
}

impl Relay {
    /// Connects to `url`; fails when Redis cannot be reached now.
    pub async fn connect(
        url: &str,
        settings: RelaySettings,
        metrics: HubMetrics,
    ) -> Result<Self, Error> {
        let client = shared_redis::client(url)?;
        let commands = shared_redis::connect(&client).await.map_err(unavailable)?;
        Ok(Self {
            client,
            commands,
            settings,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            held: Mutex::default(),
            metrics,
            release: Script::new(RELEASE),
        })
    }

    fn lost_after(&self) -> Duration {
        self.settings.heartbeat * HEARTBEATS_TO_LOSE
    }

    fn session_lock(&self, session: ObjectId) -> String {
        format!(
            "{}:session:{}:reply",
            self.settings.prefix,
            session.to_hex()
        )
    }

    fn session_latest(&self, session: ObjectId) -> String {
        format!(
            "{}:session:{}:latest",
            self.settings.prefix,
            session.to_hex()
        )
    }

    fn reply_events(&self, reply: &str) -> String {
        format!("{}:reply:{reply}:events", self.settings.prefix)
    }

    fn reply_owner(&self, reply: &str) -> String {
        format!("{}:reply:{reply}:owner", self.settings.prefix)
    }

    fn reply_stop(&self, reply: &str) -> String {
        format!("{}:reply:{reply}:stop", self.settings.prefix)
    }

    fn live(&self) -> String {
        format!("{}:live", self.settings.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:announcements", self.settings.prefix)
    }

    /// Takes the session's lock for `reply`; `false` when another reply
    /// holds it.
    pub(super) async fn reserve<R: RelayedReply + 'static>(
        &self,
        reply: &Arc<R>,
    ) -> Result<bool, Error> {
        let info = reply.info();
        let weak = Arc::downgrade(reply);
        let weak: Weak<dyn RelayedReply> = weak;
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.session_lock(info.session_id))
            .arg(&info.reply_id)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lost_after()))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("reserve", error))?;
        if taken.is_some() {
            lock(&self.held).insert(
                info.session_id,
                Held {
                    reply_id: info.reply_id.clone(),
                    reply: weak,
                },
            );
        }
        Ok(taken.is_some())
    }

    /// Asks the replica generating `info`'s reply to stop it (its next
    /// heartbeat does).
    pub(super) async fn request_stop(&self, info: &ReplyInfo) -> Result<(), Error> {
        redis::cmd("SET")
            .arg(self.reply_stop(&info.reply_id))
            .arg(&self.replica)
            .arg("PX")
            .arg(millis(self.lost_after()))
            .query_async::<()>(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("stop", error))
    }

    /// A writer for the reply this replica reserved; its task is tracked by
    /// `tasks`, so a stopping replica sends a reply's end before it exits.
    pub(super) fn writer(
        self: &Arc<Self>,
        info: Arc<ReplyInfo>,
        tasks: &TaskTracker,
    ) -> RelayWriter {
        let (items, queue) = mpsc::unbounded_channel();
        tasks.spawn(Arc::clone(self).write(Arc::clone(&info), queue));
        RelayWriter {
            relay: Arc::clone(self),
            info,
            items,
        }
    }

    /// Sends a reply's items in order, as many per round trip as are waiting.
    async fn write(
        self: Arc<Self>,
        info: Arc<ReplyInfo>,
        mut queue: mpsc::UnboundedReceiver<Item>,
    ) {
        let events = self.reply_events(&info.reply_id);
        let mut last_event = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let mut ended = false;
        while !ended && queue.recv_many(&mut batch, BATCH).await > 0 {
            let mut pipe = redis::pipe();
            for item in batch.drain(..) {
                match item {
                    Item::Announce => self.announce_started(&mut pipe, &info),
                    Item::Event {
                        id,
                        frame,
                        produced,
                    } => {
                        last_event = id;
                        pipe.cmd("XADD")
                            .arg(&events)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(self.settings.max_events)
                            .arg(format!("{id}-0"))
                            .arg("f")
                            .arg(frame.as_ref())
                            .arg("t")
                            .arg(micros(produced))
                            .ignore();
                    }
                    Item::Finish(outcome) => {
                        self.announce_ended(&mut pipe, &info, &events, last_event, outcome);
                        ended = true;
                    }
                }
            }
            // Events expire even if this replica dies before the end.
            pipe.cmd("PEXPIRE")
                .arg(&events)
                .arg(millis(if ended {
                    self.settings.linger
                } else {
                    self.settings.max_duration + self.settings.linger
                }))
                .ignore();
            if let Err(error) = pipe.query_async::<()>(&mut self.commands.clone()).await {
                self.failed("write", error);
            }
        }
        if ended {
            self.unlock(&info).await;
        }
    }

    fn announce_started(&self, pipe: &mut redis::Pipeline, info: &ReplyInfo) {
        let reply = json(info);
        pipe.cmd("HSET")
            .arg(self.live())
            .arg(&info.reply_id)
            .arg(&reply)
            .ignore();
        pipe.cmd("SET")
            .arg(self.session_latest(info.session_id))
            .arg(&reply)
            .arg("PX")
            .arg(millis(self.settings.max_duration + self.settings.linger))
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.channel())
            .arg(json(&AnnouncementMessage {
                replica: self.replica.clone(),
                state: AnnouncedState::Started,
                reply: info.clone(),
                outcome: None,
            }))
            .ignore();
    }

    fn announce_ended(
        &self,
        pipe: &mut redis::Pipeline,
        info: &ReplyInfo,
        events: &str,
        last_event: u64,
        outcome: &str,
    ) {
        // `N-1` sorts after event N: readers see the end after every event.
        pipe.cmd("XADD")
            .arg(events)
            .arg(format!("{last_event}-1"))
            .arg("end")
            .arg(outcome)
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(self.session_latest(info.session_id))
            .arg(millis(self.settings.linger))
            .ignore();
        pipe.cmd("HDEL")
            .arg(self.live())
            .arg(&info.reply_id)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.channel())
            .arg(json(&AnnouncementMessage {
                replica: self.replica.clone(),
                state: AnnouncedState::Ended,
                reply: info.clone(),
                outcome: Some(outcome.to_owned()),
            }))
            .ignore();
    }

    /// Releases the session's lock if it still holds `info`'s reply.
    async fn unlock(&self, info: &ReplyInfo) {
        {
            let mut held = lock(&self.held);
            if held
                .get(&info.session_id)
                .is_some_and(|held| held.reply_id == info.reply_id)
            {
                held.remove(&info.session_id);
            }
        }
        let released = self
            .release
            .key(self.session_lock(info.session_id))
            .arg(&info.reply_id)
            .invoke_async::<i64>(&mut self.commands.clone())
            .await;
        if let Err(error) = released {
            // The lock expires by itself after a few heartbeats.
            self.failed("unlock", error);
        }
    }

    /// Renews the locks of this replica's replies until `stop`.
    pub(super) async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(self.settings.heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let held: Vec<(ObjectId, String, Weak<dyn RelayedReply>)> = lock(&self.held)
                .iter()
                .map(|(session, held)| (*session, held.reply_id.clone(), held.reply.clone()))
                .collect();
            if held.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (session, reply, _) in &held {
                pipe.cmd("EVAL")
                    .arg(RENEW)
                    .arg(2)
                    .arg(self.session_lock(*session))
                    .arg(self.reply_stop(reply))
                    .arg(reply)
                    .arg(millis(self.lost_after()));
            }
            match pipe
                .query_async::<Vec<i64>>(&mut self.commands.clone())
                .await
            {
                Ok(renewed) => {
                    for ((session, reply, stream), renewed) in held.iter().zip(renewed) {
                        match renewed {
                            0 => {
                                tracing::warn!(session = %session.to_hex(), %reply, "a reply's hub lock expired before its heartbeat; other replicas report it lost")
                            }
                            2 => {
                                if let Some(stream) = stream.upgrade() {
                                    stream.stop();
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Err(error) => {
                    self.failed("heartbeat", error);
                }
            }
        }
    }

    /// Relays other replicas' announcements to this replica's subscribers
    /// until `stop`, reconnecting when the subscription drops.
    pub(super) async fn relay_announcements(
        self: Arc<Self>,
        local: broadcast::Sender<Announcement>,
        stop: CancellationToken,
    ) {
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                () = stop.cancelled() => return,
                subscribed = subscribed => subscribed,
            };
            match pubsub {
                Ok(mut pubsub) => {
                    let mut messages = pubsub.on_message();
                    loop {
                        let message = tokio::select! {
                            () = stop.cancelled() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        match serde_json::from_slice::<AnnouncementMessage>(
                            message.get_payload_bytes(),
                        ) {
                            Ok(message) if message.replica != self.replica => {
                                let reply = Arc::new(message.reply);
                                let announcement = match message.state {
                                    AnnouncedState::Started => Announcement::Started(reply),
                                    AnnouncedState::Ended => Announcement::Ended {
                                        reply,
                                        outcome: message.outcome.unwrap_or_default(),
                                    },
                                };
                                let _ = local.send(announcement);
                            }
                            Ok(_) => {}
                            Err(error) => {
                                tracing::warn!(%error, "ignoring a malformed hub announcement")
                            }
                        }
                    }
                    tracing::warn!("the hub's announcement subscription ended; subscribing again");
                }
                Err(error) => {
                    self.failed("subscribe", error);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.settings.heartbeat) => {}
            }
        }
    }

    /// The session's newest reply, running or ended within the grace period.
    pub(super) async fn latest(&self, session: ObjectId) -> Result<Option<ReplyInfo>, Error> {
        let latest: Option<String> = redis::cmd("GET")
            .arg(self.session_latest(session))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("latest", error))?;
        Ok(latest.and_then(|text| parse_info(&text)))
    }

    /// The session's reply while its replica still holds the lock.
    pub(super) async fn running(&self, session: ObjectId) -> Result<Option<ReplyInfo>, Error> {
        let (running, latest): (Option<String>, Option<String>) = redis::pipe()
            .cmd("GET")
            .arg(self.session_lock(session))
            .cmd("GET")
            .arg(self.session_latest(session))
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("running", error))?;
        Ok(latest
            .and_then(|text| parse_info(&text))
            .filter(|info| running.as_deref() == Some(info.reply_id.as_str())))
    }

    /// Every replica's replies in flight; entries of replicas that died are
    /// dropped (their locks expired).
    pub(super) async fn in_flight(&self) -> Result<Vec<Arc<ReplyInfo>>, Error> {
        let live: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.live())
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("in_flight", error))?;
        let replies: Vec<ReplyInfo> = live.values().filter_map(|text| parse_info(text)).collect();
        if replies.is_empty() {
            return Ok(Vec::new());
        }
        let mut locks = redis::cmd("MGET");
        for reply in &replies {
            locks.arg(self.session_lock(reply.session_id));
        }
        let holders: Vec<Option<String>> = locks
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("in_flight", error))?;
        let (running, gone): (Vec<_>, Vec<_>) = replies
            .into_iter()
            .zip(holders)
            .partition(|(reply, holder)| holder.as_deref() == Some(reply.reply_id.as_str()));
        if !gone.is_empty() {
            let mut forget = redis::cmd("HDEL");
            forget.arg(self.live());
            for (reply, _) in &gone {
                forget.arg(&reply.reply_id);
            }
            if let Err(error) = forget.query_async::<()>(&mut self.commands.clone()).await {
                self.failed("in_flight", error);
            }
        }
        Ok(running
            .into_iter()
            .map(|(reply, _)| Arc::new(reply))
            .collect())
    }

    /// Feeds `mirror` from its reply's events until the reply ends, its
    /// replica is gone (an `error` event `REPLY_LOST`), or `stop`; returns
    /// how it ended.
    pub(super) async fn follow(
        &self,
        mirror: &dyn RelayedReply,
        stop: CancellationToken,
    ) -> &'static str {
        let mut reader = MirrorReader {
            mirror,
            events: self.reply_events(&mirror.info().reply_id),
            cursor: "0-0".to_owned(),
            last_event: 0,
            unreachable_since: None,
        };
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(self.settings.heartbeat + RESPONSE_TIMEOUT));
        let mut connection = tokio::select! {
            () = stop.cancelled() => return "shutdown",
            connected = self.client.get_multiplexed_async_connection_with_config(&connection) => match connected {
                Ok(connection) => connection,
                Err(error) => {
                    self.failed("follow", error);
                    return reader.lost("the reply hub is unreachable");
                }
            },
        };
        loop {
            let read = tokio::select! {
                () = stop.cancelled() => return "shutdown",
                read = reader.read(&mut connection, Some(self.settings.heartbeat)) => read,
            };
            match read {
                Ok(Step::Ended(outcome)) => return outcome,
                Ok(Step::Lost(why)) => return reader.lost(why),
                Ok(Step::Read) => reader.unreachable_since = None,
                Ok(Step::Idle) => {
                    reader.unreachable_since = None;
                    if !self.still_running(mirror).await {
                        // The lock is gone: read what its end may have written.
                        return match reader.read(&mut connection, None).await {
                            Ok(Step::Ended(outcome)) => outcome,
                            _ => reader.lost("the replica generating the reply stopped"),
                        };
                    }
                }
                Err(error) => {
                    self.failed("follow", error);
                    let since = *reader
                        .unreachable_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.lost_after() {
                        return reader.lost("the reply hub is unreachable");
                    }
                    tokio::time::sleep(self.settings.heartbeat).await;
                }
            }
            if mirror.owners_attached() > 0 {
                self.owner_follows(&mirror.info().reply_id).await;
            }
        }
    }

    async fn still_running(&self, mirror: &dyn RelayedReply) -> bool {
        let holder: Result<Option<String>, _> = redis::cmd("GET")
            .arg(self.session_lock(mirror.info().session_id))
            .query_async(&mut self.commands.clone())
            .await;
        match holder {
            Ok(holder) => holder.as_deref() == Some(mirror.info().reply_id.as_str()),
            // Unknown: the next read decides.
            Err(_) => true,
        }
    }

    /// Marks that the reply's owner follows it on this replica.
    async fn owner_follows(&self, reply: &str) {
        let marked = redis::cmd("SET")
            .arg(self.reply_owner(reply))
            .arg(&self.replica)
            .arg("PX")
            .arg(millis(self.lost_after()))
            .query_async::<()>(&mut self.commands.clone())
            .await;
        if let Err(error) = marked {
            self.failed("owner", error);
        }
    }

    /// Whether the reply's owner follows it on another replica.
    async fn owner_elsewhere(&self, reply: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(self.reply_owner(reply))
            .query_async::<bool>(&mut self.commands.clone())
            .await
            .unwrap_or(false)
    }

    fn failed(&self, operation: &'static str, error: RedisError) -> Error {
        tracing::warn!(operation, %error, "reply hub (Redis) operation failed");
        self.metrics.relay_failed(operation);
        unavailable(error)
    }
}

/// What a replica generating a reply sends to the relay, in order.
enum Item {
    Announce,
    Event {
        id: u64,
        frame: Bytes,
        produced: SystemTime,
    },
    Finish(&'static str),
}

/// The relay side of a reply generated here. Sending never waits: a writer
/// task sends the items in order, batching what queued up meanwhile.
#[derive(Clone)]
pub struct RelayWriter {
    relay: Arc<Relay>,
    info: Arc<ReplyInfo>,
    items: mpsc::UnboundedSender<Item>,
}

impl RelayWriter {
    pub(super) fn announce(&self) {
        self.send(Item::Announce);
    }

    pub(super) fn event(&self, id: u64, frame: Bytes, produced: SystemTime) {
        self.send(Item::Event {
            id,
            frame,
            produced,
        });
    }

    pub(super) fn finish(&self, outcome: &'static str) {
        self.send(Item::Finish(outcome));
    }

    fn send(&self, item: Item) {
        // The writer task ends only after `Finish`; a send after it is a no-op.
        let _ = self.items.send(item);
    }

    /// Releases the lock of a reply that never started.
    pub(super) async fn withdraw(self) {
        drop(self.items);
        self.relay.unlock(&self.info).await;
    }

    /// Waits while the reply's owner follows it on another replica and
    /// `gone_here` holds.
    pub(super) async fn owner_gone(&self, reply: &dyn RelayedReply, gone_here: impl Fn() -> bool) {
        while gone_here()
            && !reply.is_finished()
            && self.relay.owner_elsewhere(&self.info.reply_id).await
        {
            tokio::time::sleep(self.relay.settings.heartbeat).await;
        }
    }
}

enum Step {
    /// Events were read.
    Read,
    /// Nothing new within the wait.
    Idle,
    Ended(&'static str),
    Lost(&'static str),
}

struct MirrorReader<'a> {
    mirror: &'a dyn RelayedReply,
    events: String,
    /// The last entry id read.
    cursor: String,
    last_event: u64,
    unreachable_since: Option<tokio::time::Instant>,
}

impl MirrorReader<'_> {
    /// Reads the entries after the cursor, waiting up to `block` for some.
    async fn read(
        &mut self,
        connection: &mut MultiplexedConnection,
        block: Option<Duration>,
    ) -> Result<Step, RedisError> {
        let mut command = redis::cmd("XREAD");
        command.arg("COUNT").arg(BATCH);
        if let Some(block) = block {
            command.arg("BLOCK").arg(millis(block));
        }
        command.arg("STREAMS").arg(&self.events).arg(&self.cursor);
        let reply: Option<StreamReadReply> = command.query_async(connection).await?;
        let entries: Vec<_> = reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .collect();
        if entries.is_empty() {
            return Ok(Step::Idle);
        }
        for entry in entries {
            self.cursor.clone_from(&entry.id);
            if let Some(outcome) = entry.get::<String>("end") {
                let outcome = OUTCOMES
                    .into_iter()
                    .find(|known| *known == outcome)
                    .unwrap_or("ended");
                return Ok(Step::Ended(outcome));
            }
            let id = entry
                .id
                .split_once('-')
                .and_then(|(event, _)| event.parse::<u64>().ok());
            if id != Some(self.last_event + 1) {
                return Ok(Step::Lost(
                    "earlier events of this reply are no longer kept",
                ));
            }
            let frame: Vec<u8> = entry.get("f").unwrap_or_default();
            let produced = entry
                .get::<u64>("t")
                .map(|micros| UNIX_EPOCH + Duration::from_micros(micros));
            self.last_event += 1;
            self.mirror
                .publish_at(self.last_event, Bytes::from(frame), produced);
        }
        Ok(Step::Read)
    }

    /// Ends the mirror with an `error` event: the reply can no longer be followed.
    fn lost(&mut self, why: &'static str) -> &'static str {
        tracing::warn!(reply = %self.mirror.info().reply_id, why, "a reply followed through the hub was lost");
        self.last_event += 1;
        self.mirror.publish_at(
            self.last_event,
            frame(
                self.last_event,
                "error",
                &ErrorData {
                    code: "REPLY_LOST",
                    message: why,
                },
            ),
            None,
        );
        "lost"
    }
}

fn parse_info(text: &str) -> Option<ReplyInfo> {
    serde_json::from_str(text)
        .inspect_err(|error| tracing::warn!(%error, "ignoring a malformed reply in the hub"))
        .ok()
}

fn json<T: Serialize>(value: &T) -> String {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

fn unavailable(error: RedisError) -> Error {
    Error::HubUnavailable(error.to_string())
}
