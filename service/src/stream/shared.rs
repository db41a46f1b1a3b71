//! What the hub and the relay both speak of: a reply as observers and
//! consoles see it, the announcements of replies starting and ending, and
//! the recovery of a lock whose holder panicked.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::ObjectId;

/// A reply as observers and consoles see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyInfo {
    /// Unique per reply (a session has one reply at a time, many over time).
    pub reply_id: String,
    /// 24 hexadecimal characters.
    #[serde(with = "object_id_hex")]
    #[schema(value_type = String)]
    pub session_id: ObjectId,
    /// The session's owner.
    pub user_id: String,
    /// The owner's cohorts, as the session records them.
    pub user_cohorts: Vec<String>,
    pub route: String,
    /// The user's message this reply answers (stored with the reply when
    /// it ends), so observers see the question before the answer.
    pub message: String,
    pub started_at: DateTime<Utc>,
}

impl ReplyInfo {
    pub fn new(
        session_id: ObjectId,
        user_id: String,
        user_cohorts: Vec<String>,
        route: String,
        message: String,
    ) -> Self {
        Self {
            reply_id: uuid::Uuid::now_v7().simple().to_string(),
            session_id,
            user_id,
            user_cohorts,
            route,
            message,
            started_at: crate::store::now(),
        }
    }
}

/// A reply starting or ending, on this replica or (with a relay) any.
#[derive(Debug, Clone)]
pub enum Announcement {
    Started(Arc<ReplyInfo>),
    Ended {
        reply: Arc<ReplyInfo>,
        /// As counted in `parley_streams_total`: completed, failed, …
        outcome: String,
    },
}

impl Announcement {
    pub fn reply(&self) -> &Arc<ReplyInfo> {
        match self {
            Self::Started(reply) | Self::Ended { reply, .. } => reply,
        }
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked (every
    // critical section is a single push, insert or copy).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Session ids as 24 hexadecimal characters in JSON.
mod object_id_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::store::ObjectId;

    pub fn serialize<S: Serializer>(id: &ObjectId, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&id.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectId, D::Error> {
        let text = String::deserialize(deserializer)?;
        ObjectId::parse_str(&text).map_err(serde::de::Error::custom)
    }
}
