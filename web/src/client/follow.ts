/**
 * Following a long-lived `GET` event stream (an observed session, a
 * console's live list) across dropped connections. These streams have no
 * `Last-Event-ID` resume: on reconnection the service starts over (the list
 * of replies in flight again, the running reply again from its first
 * event), which the `reconnected` event tells the caller.
 */

import { NetworkError, ServiceUnavailableError } from "./errors.js";
import { reconnectDelay, sleep } from "./retry.js";
import { readSse, type SseEvent } from "./sse.js";
import type { ConnectionEvent } from "./types.js";

export interface FollowOptions {
  /** Aborting it closes the stream (the iteration throws an AbortError). */
  signal?: AbortSignal;
  /**
   * Reconnections tried in a row (default 10); any event or `: ping` from
   * the service counts as a working connection and starts the count again.
   */
  maxReconnects?: number;
  /** First wait before reconnecting, ms (default 500; doubles, at most 5 s; a `retry` field overrides). */
  reconnectDelayMs?: number;
}

/** Opens the stream: a successful response, or the typed error of the answer. */
export type OpenStream = (signal: AbortSignal) => Promise<Response>;

/**
 * The typed events of the stream `open` answers, parsed by `parse` (which
 * answers `null` for events to skip), until `isLast` says an event ends it
 * or the signal is aborted. A connection that drops or ends is opened again
 * (after `reconnecting`, announcing `reconnected`); a network failure or a
 * 503 while reconnecting is retried; any other refusal is thrown, as is
 * every refusal of the first request.
 */
export async function* followEvents<T>(
  open: OpenStream,
  parse: (sse: SseEvent) => T | null,
  isLast: (event: T) => boolean,
  options: FollowOptions = {},
): AsyncGenerator<T | ConnectionEvent> {
  const signal = options.signal ?? new AbortController().signal;
  const maxReconnects = options.maxReconnects ?? 10;
  const firstDelayMs = options.reconnectDelayMs ?? 500;
  let serverDelayMs: number | undefined;
  let failures = 0;
  let response: Response | null = await open(signal);
  for (;;) {
    if (response !== null) {
      try {
        const body = response.body;
        if (body === null) throw new NetworkError("the event stream has no body");
        const events = readSse(
          body,
          (milliseconds) => (serverDelayMs = milliseconds),
          () => (failures = 0),
        );
        for await (const sse of events) {
          const event = parse(sse);
          if (event === null) continue;
          // Events already read are not delivered once closed.
          signal.throwIfAborted();
          failures = 0;
          yield event;
          if (isLast(event)) return;
        }
      } catch (error) {
        if (signal.aborted) throw error;
        // A dropped connection: reconnect below.
      }
    }
    signal.throwIfAborted();
    failures += 1;
    if (failures > maxReconnects) {
      throw new NetworkError("the connection to the service was lost and could not be re-established");
    }
    const delayMs = reconnectDelay(failures, firstDelayMs, serverDelayMs);
    yield { type: "reconnecting", attempt: failures, delayMs };
    await sleep(delayMs, signal);
    try {
      response = await open(signal);
    } catch (error) {
      if (error instanceof NetworkError || error instanceof ServiceUnavailableError) {
        response = null;
        continue;
      }
      throw error;
    }
    yield { type: "reconnected" };
  }
}
