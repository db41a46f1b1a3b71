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
}

export interface Balance {
  userId: string;
  balance: number;
  held: number;
  available: number;
}

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
