/**
 * The Parley API from a browser (or any runtime with `fetch`): JSON calls
 * with typed errors, and streamed replies that re-attach by themselves.
 */

import {
  apiError,
  ForbiddenError,
  NetworkError,
  NoActiveReplyError,
  NotFoundError,
  ServiceUnavailableError,
} from "./errors.js";
import { liveEvent, observeEvent, replyEvent } from "./events.js";
import { followEvents, type FollowOptions } from "./follow.js";
import { reconnectDelay, sleep } from "./retry.js";
import { readSse } from "./sse.js";
import type {
  AuditPage,
  Balance,
  DevSignIn,
  DevToken,
  LiveEvent,
  ModelInfo,
  Priority,
  Recommendation,
  ObserveEvent,
  ReplyEvent,
  Role,
  SendMessage,
  Session,
  SessionList,
  SessionSummary,
  UsagePage,
} from "./types.js";

export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

export interface ClientOptions {
  /** Origin (and path prefix) of the service; "" for the page's own origin. */
  baseUrl?: string;
  /** The bearer token to send, read before every request. */
  token: () => string | null | undefined;
  /** `fetch` to use (tests pass a fake). */
  fetch?: FetchLike;
}

export interface ReplyOptions {
  /** Aborting it stops reading here; the reply goes on on the server. */
  signal?: AbortSignal;
  /** Reconnections tried in a row after a dropped connection (default 10). */
  maxReconnects?: number;
  /** First wait before reconnecting, ms (default 500; doubles, at most 5 s; a `retry` field overrides). */
  reconnectDelayMs?: number;
}

interface RequestOptions {
  body?: unknown;
  signal?: AbortSignal;
  headers?: Record<string, string>;
}

const SESSION_ID = /^[0-9a-f]{24}$/;

export class ParleyClient {
  private readonly baseUrl: string;
  private readonly token: () => string | null | undefined;
  private readonly fetchImpl: FetchLike;

  constructor(options: ClientOptions) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    this.token = options.token;
    // Called through a closure: a detached `window.fetch` throws "Illegal invocation".
    this.fetchImpl = options.fetch ?? ((input, init) => fetch(input, init));
  }

  listSessions(page = 1, limit = 50): Promise<SessionList> {
    return this.json("GET", `/api/chat/sessions?page=${page}&limit=${limit}`);
  }

  createSession(fields: { title?: string; route?: string } = {}): Promise<Session> {
    return this.json("POST", "/api/chat/sessions", { body: fields });
  }

  getSession(sessionId: string): Promise<Session> {
    return this.json("GET", sessionPath(sessionId));
  }

  renameSession(sessionId: string, title: string): Promise<SessionSummary> {
    return this.json("PATCH", sessionPath(sessionId), { body: { title } });
  }

  async deleteSession(sessionId: string): Promise<void> {
    await this.json("DELETE", sessionPath(sessionId));
  }

  async listModels(): Promise<ModelInfo[]> {
    const answer = await this.json<{ models: ModelInfo[] }>("GET", "/api/models");
    return answer.models;
  }

  /** The best route for `task` the caller may use and can afford now (402 when none is affordable). */
  recommendModel(task: string, priority: Priority): Promise<Recommendation> {
    return this.json("POST", "/api/models/recommend", { body: { task, priority } });
  }

  /** The caller's credits, or (admins only) `userId`'s. */
  balance(userId?: string): Promise<Balance> {
    return this.json("GET", `/api/credits/balance${query({ userId })}`);
  }

  /** What the caller's replies (admins: `userId`'s) held and were charged, newest first. */
  usage(options: { userId?: string; page?: number; limit?: number } = {}): Promise<UsagePage> {
    return this.json("GET", `/api/credits/usage${query(options)}`);
  }

  /** Adds `credits` to `userId`'s account (admins only); answers the new balance. */
  grantCredits(userId: string, credits: number): Promise<Balance> {
    return this.json("POST", "/api/admin/credits/grant", { body: { userId, credits } });
  }

  /**
   * Watches a session's replies (supervisors of its owner's cohorts, and
   * admins): the running reply from its first event, then every later one,
   * each framed by `observe` events. After `reconnected` the running reply
   * starts over from its first event: reset what shows it. Ends with
   * `too-slow` when the service cut this observer; throws the refusal
   * otherwise (404 for a session the caller may not observe, 403
   * `OBSERVATION_DISABLED`). Close it with `options.signal`.
   */
  observeSession(sessionId: string, options: FollowOptions = {}): AsyncGenerator<ObserveEvent> {
    const path = `${sessionPath(sessionId)}/observe`;
    return followEvents(
      (signal) => this.eventStream(path, signal),
      observeEvent,
      (event) => event.type === "too-slow",
      options,
    );
  }

  /**
   * The replies in flight in the caller's cohorts (admins: all), live:
   * `replies` (the whole list: first, and again after a reconnection), then
   * `started` and `ended`. Supervisors and admins only (users: 403).
   */
  liveReplies(options: FollowOptions = {}): AsyncGenerator<LiveEvent> {
    return followEvents((signal) => this.eventStream("/api/observe/live", signal), liveEvent, () => false, options);
  }

  /** Observations of users in the caller's cohorts (admins: all), newest first. */
  observationAudit(options: { userId?: string; page?: number; limit?: number } = {}): Promise<AuditPage> {
    return this.json("GET", `/api/observe/audit${query(options)}`);
  }

  /** Whether this service offers dev sign-in (local mode only); `null` when not. */
  async devSignIn(): Promise<DevSignIn | null> {
    try {
      return await this.json<DevSignIn>("GET", "/api/dev/token");
    } catch (error) {
      if (error instanceof NotFoundError || error instanceof ForbiddenError) return null;
      throw error;
    }
  }

  /** A dev token for anyone (local mode only). */
  devToken(fields: { sub: string; role: Role; cohorts: string[] }): Promise<DevToken> {
    return this.json("POST", "/api/dev/token", { body: fields });
  }

  /**
   * Sends a message; the reply streams back in the POST's own response.
   * Iterate the result for its events. Errors before the stream starts
   * (402, 409, 429, 503…) are thrown by the iteration as typed errors.
   */
  streamReply(sessionId: string, message: SendMessage, options: ReplyOptions = {}): ReplyStream {
    return new ReplyStream(this, sessionId, { kind: "send", message }, options);
  }

  /**
   * Re-attaches to the session's running reply after event `afterId` (0:
   * from the start), e.g. after a page reload. If the reply is over, the
   * stream yields `ended-unseen`: the session holds what was stored.
   */
  resumeReply(sessionId: string, afterId: number, options: ReplyOptions = {}): ReplyStream {
    return new ReplyStream(this, sessionId, { kind: "resume", afterId }, options);
  }

  /**
   * Stops the session's running reply on the server. Answers once what was
   * generated is stored; `false` when no reply was running.
   */
  async stopReply(sessionId: string): Promise<boolean> {
    try {
      await this.json("DELETE", `${sessionPath(sessionId)}/stream`);
      return true;
    } catch (error) {
      if (error instanceof NoActiveReplyError) return false;
      throw error;
    }
  }

  /** A successful response, or the typed error of the answer. */
  async request(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const headers: Record<string, string> = { ...options.headers };
    const token = this.token();
    if (token) headers["Authorization"] = `Bearer ${token}`;
    const init: RequestInit = { method, headers, signal: options.signal, cache: "no-store" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response: Response;
    try {
      response = await this.fetchImpl(this.baseUrl + path, init);
    } catch (error) {
      if (options.signal?.aborted) throw error;
      throw new NetworkError(`${method} ${path}: the service did not answer`, { cause: error });
    }
    if (!response.ok) throw await apiError(response);
    return response;
  }

  private eventStream(path: string, signal: AbortSignal): Promise<Response> {
    return this.request("GET", path, { signal, headers: { Accept: "text/event-stream" } });
  }

  private async json<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const response = await this.request(method, path, {
      ...options,
      headers: { Accept: "application/json", ...options.headers },
    });
    return (await response.json()) as T;
  }
}

type Start = { kind: "send"; message: SendMessage } | { kind: "resume"; afterId: number };

/**
 * One reply's events, as an async iterable (iterate it once). A dropped
 * connection is re-attached with `Last-Event-ID`, so the events continue
 * with no gap and no duplicate; `reattached` marks the seam.
 */
export class ReplyStream implements AsyncIterable<ReplyEvent> {
  readonly sessionId: string;
  /** Id of the last event delivered (0: none yet). */
  lastEventId: number;
  private readonly client: ParleyClient;
  private readonly start: Start;
  private readonly controller = new AbortController();
  private readonly maxReconnects: number;
  private readonly firstDelayMs: number;
  private serverDelayMs: number | undefined;
  private iterated = false;

  constructor(client: ParleyClient, sessionId: string, start: Start, options: ReplyOptions) {
    this.client = client;
    this.sessionId = checkedSessionId(sessionId);
    this.start = start;
    this.lastEventId = start.kind === "resume" ? start.afterId : 0;
    this.maxReconnects = options.maxReconnects ?? 10;
    this.firstDelayMs = options.reconnectDelayMs ?? 500;
    const outer = options.signal;
    if (outer) {
      if (outer.aborted) this.controller.abort(outer.reason);
      else outer.addEventListener("abort", () => this.controller.abort(outer.reason), { once: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<ReplyEvent> {
    if (this.iterated) throw new Error("a ReplyStream can be iterated once");
    this.iterated = true;
    return this.events();
  }

  /**
   * Stops the reply on the server: the stream then ends with an `error`
   * event `CANCELLED`, and what was generated is stored (`incomplete`).
   * `false` when the reply had already ended.
   */
  stop(): Promise<boolean> {
    return this.client.stopReply(this.sessionId);
  }

  /** Stops reading here (the iteration throws an AbortError); the reply goes on on the server. */
  detach(): void {
    this.controller.abort(new DOMException("detached", "AbortError"));
  }

  private get signal(): AbortSignal {
    return this.controller.signal;
  }

  private async *events(): AsyncGenerator<ReplyEvent> {
    let response: Response | null;
    let connected = false;
    if (this.start.kind === "send") {
      try {
        response = await this.client.request("POST", `${sessionPath(this.sessionId)}/stream`, {
          body: this.start.message,
          signal: this.signal,
          headers: { Accept: "text/event-stream" },
        });
        connected = true;
      } catch (error) {
        // Whether the POST reached the service is unknown: look for its reply.
        if (!(error instanceof NetworkError)) throw error;
        response = null;
      }
    } else {
      response = await this.reattach();
      if (response === null) {
        yield { type: "ended-unseen", afterId: this.lastEventId };
        return;
      }
      connected = true;
    }
    let failures = 0;
    for (;;) {
      if (response !== null) {
        try {
          for await (const sse of readSse(responseBody(response), (ms) => (this.serverDelayMs = ms))) {
            const event = replyEvent(sse);
            if (event === null) continue;
            // Events already read are not delivered once detached.
            this.signal.throwIfAborted();
            this.lastEventId = event.id;
            failures = 0;
            yield event;
            if (event.type === "complete" || event.type === "error") return;
          }
        } catch (error) {
          if (this.signal.aborted) throw error;
          // A dropped connection: re-attach below.
        }
      }
      // The connection ended before the reply did.
      this.signal.throwIfAborted();
      failures += 1;
      if (failures > this.maxReconnects) {
        throw new NetworkError("the connection to the reply was lost and could not be re-established");
      }
      await sleep(reconnectDelay(failures, this.firstDelayMs, this.serverDelayMs), this.signal);
      try {
        response = await this.reattach();
      } catch (error) {
        if (error instanceof NetworkError || error instanceof ServiceUnavailableError) {
          response = null;
          continue;
        }
        throw error;
      }
      if (response === null) {
        if (!connected) {
          throw new NetworkError("the message could not be sent: the service did not answer");
        }
        yield { type: "ended-unseen", afterId: this.lastEventId };
        return;
      }
      connected = true;
      yield { type: "reattached", afterId: this.lastEventId };
    }
  }

  /** `GET …/stream` after the last event; `null` when no reply is running. */
  private async reattach(): Promise<Response | null> {
    try {
      return await this.client.request("GET", `${sessionPath(this.sessionId)}/stream`, {
        signal: this.signal,
        headers: { Accept: "text/event-stream", "Last-Event-ID": String(this.lastEventId) },
      });
    } catch (error) {
      if (error instanceof NoActiveReplyError) return null;
      throw error;
    }
  }

}

function responseBody(response: Response): ReadableStream<Uint8Array> {
  if (response.body === null) throw new NetworkError("the reply stream has no body");
  return response.body;
}

function checkedSessionId(sessionId: string): string {
  if (!SESSION_ID.test(sessionId)) throw new TypeError(`not a session id: ${JSON.stringify(sessionId)}`);
  return sessionId;
}

function sessionPath(sessionId: string): string {
  return `/api/chat/sessions/${checkedSessionId(sessionId)}`;
}

/** A query string of the defined `fields` (`""` when none). */
function query(fields: Record<string, string | number | undefined>): string {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(fields)) {
    if (value !== undefined && value !== "") params.set(name, String(value));
  }
  const text = params.toString();
  return text === "" ? "" : `?${text}`;
}
