/** Fakes for the client library's tests: a queued `fetch`, SSE responses, error answers. */

import { ParleyClient } from "../../src/client/index.js";

export const SESSION = "0123456789abcdef01234567";
export const encoder = new TextEncoder();

export interface Call {
  method: string;
  url: string;
  headers: Record<string, string>;
  body: unknown;
}

export type Answer = Response | Error | ((call: Call) => Response | Error);

/** A fake `fetch` answering from a queue, recording every call. */
export function fakeFetch(answers: Answer[]): { fetch: (url: string, init: RequestInit) => Promise<Response>; calls: Call[] } {
  const calls: Call[] = [];
  const fetch = async (url: string, init: RequestInit): Promise<Response> => {
    const call: Call = {
      method: init.method ?? "GET",
      url,
      headers: { ...(init.headers as Record<string, string>) },
      body: typeof init.body === "string" ? JSON.parse(init.body) : undefined,
    };
    calls.push(call);
    init.signal?.throwIfAborted();
    const next = answers.shift();
    if (next === undefined) throw new Error(`unexpected call ${call.method} ${url}`);
    const answer = typeof next === "function" ? next(call) : next;
    if (answer instanceof Error) throw answer;
    return answer;
  };
  return { fetch, calls };
}

/** One SSE frame with an id. */
export function frame(id: number, event: string, data: unknown): string {
  return `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

/** One SSE frame without an id (events about the stream itself). */
export function unnumbered(event: string, data: unknown): string {
  return `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

export const MODEL = frame(1, "model", { model: "sim", route: "default", fallbackApplied: false, downgraded: false });
export const chunk = (id: number, text: string): string => frame(id, "chunk", { text, tokens: 1, totalTokens: id - 1 });
export const COMPLETE = (id: number): string =>
  frame(id, "complete", {
    usage: { inputTokens: 3, outputTokens: 4 },
    messageId: "fedcba9876543210fedcba98",
    credits: { charged: 0.012, remaining: 99.988 },
  });

/** An SSE response; with `drop`, the connection breaks after that text. */
export function sse(text: string, options: { drop?: boolean; chunkSize?: number } = {}): Response {
  const bytes = encoder.encode(text);
  const size = options.chunkSize ?? 7;
  let at = 0;
  // Pulled piece by piece: an error only after everything before it was read
  // (erroring a stream discards what is still queued).
  const body = new ReadableStream<Uint8Array>(
    {
      pull(controller) {
        if (at < bytes.length) {
          controller.enqueue(bytes.slice(at, at + size));
          at += size;
        } else if (options.drop) {
          controller.error(new TypeError("network error"));
        } else {
          controller.close();
        }
      },
    },
    { highWaterMark: 0 },
  );
  return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
}

export function error(status: number, body: object, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

export function client(fetch: (url: string, init: RequestInit) => Promise<Response>): ParleyClient {
  return new ParleyClient({ token: () => "T0KEN", fetch });
}

/** Everything an async iterable yields. */
export async function collect<T>(events: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const event of events) out.push(event);
  return out;
}
