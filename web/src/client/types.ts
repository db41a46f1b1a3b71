/** JSON shapes of the Parley API (service/README.md has the reference). */

export type Role = "user" | "supervisor" | "admin";

export interface TokenTotals {
  input: number;
  output: number;
}

export interface SessionSummary {
  sessionId: string;
  userId: string;
  title: string;
  route: string;
  modelId: string;
  createdAt: string;
  updatedAt: string;
  tokenTotals: TokenTotals;
  messageCount: number;
}

export interface Message {
  id: string;
  role: "system" | "user" | "assistant";
  content: string;
  timestamp: string;
  /** A reply cut short after some output. */
  incomplete?: boolean;
}

export interface Session extends SessionSummary {
  messages: Message[];
  /** Who observed this session's replies, newest first (at most 20; `GET` of one session only). */
  observedBy?: SessionObserver[];
}

/** One observation of a session, as its owner sees it. */
export interface SessionObserver {
  observerId: string;
  observerRole: "supervisor" | "admin";
  startedAt: string;
  /** Absent while the observation goes on. */
  endedAt?: string;
}

export interface SessionList {
  sessions: SessionSummary[];
  pagination: { total: number; page: number; limit: number; pages: number };
}

export interface ModelInfo {
  /** What to pass as `route`. */
  alias: string;
  model: string;
  provider: string;
  /** Credits per 1000 tokens, as decimal strings. */
  pricing: { inputPer1k: string; outputPer1k: string };
  maxOutputTokens: number;
  isDefault: boolean;
  /** The first target's circuit breaker: `open` while it fails, when replies skip it for the next target. */
  primaryState: "closed" | "half_open" | "open";
  primaryOpen: boolean;
  /** What the route is good for (`chat`, `code`, `fast`…). */
  capabilities: string[];
}

/** What matters most when choosing a route for a task. */
export type Priority = "quality" | "cost" | "speed";

/** `POST /api/models/recommend`: the best route the caller may use and can afford now. */
export interface Recommendation {
  alias: string;
  /** The target that would answer now. */
  model: string;
  /** The most a reply costs on it, in credits. */
  worstCase: number;
  /** The caller's available credits. */
  available: number;
  primaryState: ModelInfo["primaryState"];
  /** Why this route, in one sentence. */
  reason: string;
}

export interface Balance {
  userId: string;
  balance: number;
  held: number;
  available: number;
}

/** One usage record of an account: what one reply held and was charged. */
export interface UsageRecord {
  requestId: string;
  sessionId: string;
  route: string;
  modelId: string;
  inputTokens: number;
  outputTokens: number;
  held: number;
  charged: number;
  /** Cost above the hold, not charged. */
  overage: number;
  outcome: "completed" | "cancelled" | "failed" | "released" | "reaped" | "expired";
  /** The tokens come from progress reports, not a final count. */
  estimated: boolean;
  startedAt: string;
  settledAt: string;
}

export interface UsagePage {
  userId: string;
  page: number;
  limit: number;
  /** Newest first; fewer than `limit` on the last page. */
  records: UsageRecord[];
}

export interface Pagination {
  total: number;
  page: number;
  limit: number;
  pages: number;
}

/** One observation in the audit. */
export interface ObservationRecord {
  id: string;
  observerId: string;
  observerRole: "supervisor" | "admin";
  observedUserId: string;
  sessionId: string;
  startedAt: string;
  /** Absent while the observation goes on (or when its replica died). */
  endedAt?: string;
  /** How it ended: `left`, `too_slow` or `shutdown`. */
  outcome?: string;
}

export interface AuditPage {
  /** Newest first. */
  observations: ObservationRecord[];
  pagination: Pagination;
}

/** A reply in flight, as a console sees it. */
export interface ReplyInfo {
  /** Unique per reply (a session has one reply at a time, many over time). */
  replyId: string;
  sessionId: string;
  /** The session's owner. */
  userId: string;
  userCohorts: string[];
  route: string;
  /** The user's message the reply answers. */
  message: string;
  startedAt: string;
}

/**
 * One event of the console's live list (`GET /api/observe/live`). `replies`
 * replaces the whole list (it comes first, and again after the stream fell
 * behind or re-connected); `started` and `ended` change it. The client adds
 * `reconnecting` and `reconnected` around a dropped connection.
 */
export type LiveEvent =
  | { type: "replies"; replies: ReplyInfo[] }
  | { type: "started"; reply: ReplyInfo }
  /** `outcome`: completed, failed, interrupted, abandoned, shutdown, unpaid, max_duration, lost. */
  | { type: "ended"; reply: ReplyInfo; outcome: string }
  | ConnectionEvent;

/** Data of an observer's `observe` event: a reply of the session starts or ends. */
export interface ObserveEventData {
  sessionId: string;
  userId: string;
  replyId: string;
  state: "started" | "ended";
  /** On `started`: the user's message the reply answers. */
  message?: string;
  /** On `ended`: completed, failed, interrupted, abandoned, shutdown, unpaid, max_duration, lost. */
  outcome?: string;
}

/**
 * One event of an observed session (`GET …/observe`): each reply is framed
 * by `observe` started/ended, and its events are the owner's (`model`,
 * `chunk`, `complete`, `error`, with the owner's ids). `too-slow`: the
 * service cut this observer because it fell behind (the stream ends). After
 * `reconnected` the running reply is replayed from its first event, so a
 * view of it starts over.
 */
export type ObserveEvent =
  | Extract<ReplyEvent, { id: number }>
  | { type: "observe"; data: ObserveEventData }
  | { type: "too-slow"; data: ErrorEventData }
  | ConnectionEvent;

/** Added by the client around a dropped connection of a console's stream. */
export type ConnectionEvent =
  | { type: "reconnecting"; attempt: number; delayMs: number }
  | { type: "reconnected" };

export interface DevSignIn {
  ttlSeconds: number;
  roles: Role[];
}

export interface DevToken {
  token: string;
  sub: string;
  role: Role;
  cohorts: string[];
  expiresAt: string;
}

export interface SendMessage {
  message: string;
  /** Route alias; defaults to the session's. */
  route?: string;
}

/** Data of the `model` event: which model answers. */
export interface ModelEventData {
  model: string;
  route: string;
  fallbackApplied: boolean;
  downgraded: boolean;
}

/** Data of a `chunk` event: the next piece of the reply's text. */
export interface ChunkEventData {
  text: string;
  tokens: number;
  totalTokens: number;
}

/** Data of the `complete` event. */
export interface CompleteEventData {
  usage: { inputTokens: number; outputTokens: number };
  messageId: string;
  /** What the reply cost and the available credits after it (absent when not settled yet). */
  credits?: { charged: number; remaining: number };
}

/** Data of the `error` event that ends a reply early. */
export interface ErrorEventData {
  /** `MODEL_*`, `CANCELLED`, `SHUTTING_DOWN`, … */
  code: string;
  message: string;
}

/**
 * One event of a streamed reply. `model`, `chunk`, `complete` and `error`
 * come from the service, with their SSE `id`; the client adds `reattached`
 * after it reconnected, and `ended-unseen` when the reply ended while it
 * was disconnected (the session holds what was stored: reload it).
 */
export type ReplyEvent =
  | { type: "model"; id: number; data: ModelEventData }
  | { type: "chunk"; id: number; data: ChunkEventData }
  | { type: "complete"; id: number; data: CompleteEventData }
  | { type: "error"; id: number; data: ErrorEventData }
  | { type: "reattached"; afterId: number }
  | { type: "ended-unseen"; afterId: number };
