//! Reading a service's SSE responses in tests, with a standards-following
//! parser and an upper bound on every wait (a bound, never a sleep).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

/// Upper bound for the next event of a stream that should keep coming.
pub const PROMPTLY: Duration = Duration::from_secs(30);

pub type Events = BoxStream<'static, Event>;

/// The events of an SSE response (comments such as `: ping` are skipped).
pub fn events(response: reqwest::Response) -> Events {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| event.expect("a malformed SSE stream"))
        .boxed()
}

/// The next event; panics if the stream ends or nothing comes within [`PROMPTLY`].
pub async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(PROMPTLY, events.next())
        .await
        .expect("no event")
        .expect("the stream ended")
}

/// Events until (and with) the first one named one of `last`.
pub async fn until(events: &mut Events, last: &[&str]) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next(events).await;
        let done = last.contains(&event.event.as_str());
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Every event until the stream ends.
pub async fn drain(events: Events) -> Vec<Event> {
    tokio::time::timeout(PROMPTLY, events.collect())
        .await
        .expect("the stream did not end")
}

/// An event's JSON data.
pub fn data(event: &Event) -> Value {
    serde_json::from_str(&event.data).expect("event data is not JSON")
}
