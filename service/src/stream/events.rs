//! The events of a reply, typed, as its generation produces them. The hub's
//! SSE frames (the chat API's owners, observers, other replicas) are encoded
//! from them once; a connection of the OpenAI-compatible API reads them
//! directly and encodes its own chunks, so no API ever parses another's
//! frames.

use super::billing::Charge;
use crate::providers::{StopReason, Usage};
use crate::store::ObjectId;

#[derive(Debug, Clone, PartialEq)]
pub enum ReplyEvent {
    /// The first output is on its way from `model`.
    Model {
        model: String,
        fallback_applied: bool,
        /// The caller could not afford the route's first target; the route
        /// let the reply fall to the strongest one they could.
        downgraded: bool,
    },
    /// Text from one provider delta.
    Chunk { text: String, total_tokens: u32 },
    /// The reply ended normally and was paid for.
    Complete {
        usage: Usage,
        stop_reason: StopReason,
        /// The reply's message (stored when the reply has a session).
        message_id: ObjectId,
        /// `None` when settling failed (the hold's lease settles it later).
        charge: Option<Charge>,
    },
    /// The reply ended otherwise; always the last event.
    Error { code: &'static str, message: String },
}
