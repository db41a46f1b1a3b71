/**
 * Typed events from parsed SSE events: a reply's (`replyEvent`), an
 * observed session's (`observeEvent`) and a console's live list
 * (`liveEvent`). Each checks the fields it relies on and answers `null` for
 * anything it does not know, so a newer service never breaks an older page.
 */

import type { SseEvent } from "./sse.js";
import type { LiveEvent, ObserveEvent, ReplyEvent, ReplyInfo } from "./types.js";

/** The events the service sends for a reply (each with its SSE `id`). */
export type ServerReplyEvent = Extract<ReplyEvent, { id: number }>;

/** The code of the `error` event that ends an observer which fell behind. */
export const OBSERVER_TOO_SLOW = "OBSERVER_TOO_SLOW";

/** The typed reply event of an SSE event; `null` for events this client does not know. */
export function replyEvent(sse: SseEvent): ServerReplyEvent | null {
  const id = Number(sse.lastEventId);
  if (!Number.isSafeInteger(id) || id <= 0) return null;
  const fields = jsonObject(sse.data);
  if (fields === null) return null;
  // Checked below for the fields each event relies on.
  const data: unknown = fields;
  switch (sse.type) {
    case "model":
      return typeof fields.model === "string"
        ? { type: "model", id, data: data as Extract<ReplyEvent, { type: "model" }>["data"] }
        : null;
    case "chunk":
      return typeof fields.text === "string"
        ? { type: "chunk", id, data: data as Extract<ReplyEvent, { type: "chunk" }>["data"] }
        : null;
    case "complete":
      return typeof fields.messageId === "string"
        ? { type: "complete", id, data: data as Extract<ReplyEvent, { type: "complete" }>["data"] }
        : null;
    case "error":
      return typeof fields.code === "string"
        ? { type: "error", id, data: data as Extract<ReplyEvent, { type: "error" }>["data"] }
        : null;
    default:
      return null;
  }
}

/**
 * The typed event of an observed session. `observe` and the observer's own
 * `error` (`OBSERVER_TOO_SLOW`) carry no id; the reply's events carry the
 * owner's ids (the SSE id persists across events, so the code, not the id,
 * tells the observer's error from the reply's).
 */
export function observeEvent(sse: SseEvent): Exclude<ObserveEvent, { type: "reconnecting" | "reconnected" }> | null {
  const fields = jsonObject(sse.data);
  if (fields === null) return null;
  if (sse.type === "observe") {
    const state = fields.state;
    const data: unknown = fields;
    return typeof fields.replyId === "string" &&
      typeof fields.userId === "string" &&
      (state === "started" || state === "ended")
      ? { type: "observe", data: data as Extract<ObserveEvent, { type: "observe" }>["data"] }
      : null;
  }
  if (sse.type === "error" && fields.code === OBSERVER_TOO_SLOW) {
    return { type: "too-slow", data: { code: OBSERVER_TOO_SLOW, message: String(fields.message ?? "") } };
  }
  return replyEvent(sse);
}

/** The typed event of a console's live list. */
export function liveEvent(sse: SseEvent): Exclude<LiveEvent, { type: "reconnecting" | "reconnected" }> | null {
  const fields = jsonObject(sse.data);
  if (fields === null) return null;
  switch (sse.type) {
    case "replies":
      return Array.isArray(fields.replies) && fields.replies.every(isReplyInfo)
        ? { type: "replies", replies: fields.replies }
        : null;
    case "started":
      return isReplyInfo(fields.reply) ? { type: "started", reply: fields.reply } : null;
    case "ended":
      return isReplyInfo(fields.reply) && typeof fields.outcome === "string"
        ? { type: "ended", reply: fields.reply, outcome: fields.outcome }
        : null;
    default:
      return null;
  }
}

function isReplyInfo(value: unknown): value is ReplyInfo {
  if (typeof value !== "object" || value === null) return false;
  const fields = value as Record<string, unknown>;
  return (
    typeof fields.replyId === "string" &&
    typeof fields.sessionId === "string" &&
    typeof fields.userId === "string" &&
    Array.isArray(fields.userCohorts) &&
    typeof fields.route === "string" &&
    typeof fields.startedAt === "string"
  );
}

function jsonObject(data: string): Record<string, unknown> | null {
  let parsed: unknown;
  try {
    parsed = JSON.parse(data);
  } catch {
    return null;
  }
  return typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)
    ? (parsed as Record<string, unknown>)
    : null;
}
