import assert from "node:assert/strict";
import { test } from "node:test";

import {
  InsufficientCreditsError,
  NetworkError,
  RateLimitedError,
  ReplyCheckpoints,
  ReplyInProgressError,
  ServiceUnavailableError,
  UnauthorizedError,
  checkpointed,
  parseRetryAfter,
  type ReplyCheckpoint,
  type ReplyEvent,
} from "../../src/client/index.js";
import { COMPLETE, MODEL, SESSION, chunk, client, collect, encoder, error, fakeFetch, sse } from "./fakes.js";

function text(events: ReplyEvent[]): string {
  return events.map((event) => (event.type === "chunk" ? event.data.text : "")).join("");
}

test("a reply streams from the POST itself, typed, with the bearer token", async () => {
  const { fetch, calls } = fakeFetch([sse(MODEL + ": ping\n\n" + chunk(2, "Hello") + chunk(3, " world") + COMPLETE(4))]);
  const events = await collect(client(fetch).streamReply(SESSION, { message: "hi", route: "default" }));
  assert.deepEqual(
    events.map((event) => event.type),
    ["model", "chunk", "chunk", "complete"],
  );
  assert.equal(text(events), "Hello world");
  const complete = events[3];
  assert.equal(complete?.type === "complete" && complete.data.credits?.charged, 0.012);
  assert.equal(calls.length, 1, "one request: no second GET racing the POST");
  assert.equal(calls[0]?.method, "POST");
  assert.equal(calls[0]?.url, `/api/chat/sessions/${SESSION}/stream`);
  assert.equal(calls[0]?.headers["Authorization"], "Bearer T0KEN");
  assert.equal(calls[0]?.headers["Content-Type"], "application/json");
  assert.deepEqual(calls[0]?.body, { message: "hi", route: "default" });
});

test("a dropped connection re-attaches after the last event: no gap, no duplicate", async () => {
  const { fetch, calls } = fakeFetch([
    sse(MODEL + chunk(2, "one") + chunk(3, " two") + "id: 4\nevent: chunk\ndata: {\"te", { drop: true }),
    new TypeError("connection refused"),
    sse(chunk(4, " three") + chunk(5, " four"), { drop: false }), // ends without complete: re-attach again
    sse(COMPLETE(6)),
  ]);
  const stream = client(fetch).streamReply(SESSION, { message: "hi" }, { reconnectDelayMs: 1 });
  const events = await collect(stream);
  assert.equal(text(events), "one two three four");
  assert.deepEqual(
    events.map((event) => event.type),
    ["model", "chunk", "chunk", "reattached", "chunk", "chunk", "reattached", "complete"],
  );
  assert.deepEqual(
    calls.map((call) => [call.method, call.headers["Last-Event-ID"]]),
    [
      ["POST", undefined],
      ["GET", "3"],
      ["GET", "3"],
      ["GET", "5"],
    ],
  );
  assert.equal(stream.lastEventId, 6);
});

test("a reply that ended while disconnected says so (404 NO_ACTIVE_REPLY)", async () => {
  const { fetch } = fakeFetch([
    sse(MODEL + chunk(2, "partial"), { drop: true }),
    error(404, { code: "NO_ACTIVE_REPLY", message: "no reply" }),
  ]);
  const events = await collect(client(fetch).streamReply(SESSION, { message: "hi" }, { reconnectDelayMs: 1 }));
  assert.deepEqual(events.at(-1), { type: "ended-unseen", afterId: 2 });
});

test("a POST that got no answer looks for its reply, and fails when there is none", async () => {
  const found = fakeFetch([new TypeError("reset"), sse(MODEL + chunk(2, "x") + COMPLETE(3))]);
  const events = await collect(client(found.fetch).streamReply(SESSION, { message: "hi" }, { reconnectDelayMs: 1 }));
  assert.equal(text(events), "x");
  assert.equal(found.calls[1]?.headers["Last-Event-ID"], "0");

  const lost = fakeFetch([new TypeError("reset"), error(404, { code: "NO_ACTIVE_REPLY", message: "none" })]);
  await assert.rejects(
    collect(client(lost.fetch).streamReply(SESSION, { message: "hi" }, { reconnectDelayMs: 1 })),
    NetworkError,
  );
});

test("reconnecting gives up after maxReconnects failures in a row", async () => {
  const { fetch, calls } = fakeFetch([
    sse(MODEL, { drop: true }),
    new TypeError("down"),
    error(503, { code: "SHUTTING_DOWN", message: "bye" }),
    new TypeError("down"),
  ]);
  await assert.rejects(
    collect(client(fetch).streamReply(SESSION, { message: "hi" }, { reconnectDelayMs: 1, maxReconnects: 3 })),
    NetworkError,
  );
  assert.equal(calls.length, 4);
});

test("refusals before the stream are typed errors", async () => {
  const cases: Array<[Response, new (...args: never[]) => Error, (error: never) => void]> = [
    [
      error(402, { code: "INSUFFICIENT_CREDITS", message: "short", balance: 1, available: 0.5, requiredCredits: 2.5 }),
      InsufficientCreditsError,
      (e: InsufficientCreditsError) => {
        assert.equal(e.available, 0.5);
        assert.equal(e.requiredCredits, 2.5);
      },
    ],
    [error(409, { code: "REPLY_IN_PROGRESS", message: "busy" }), ReplyInProgressError, () => {}],
    [
      error(429, { code: "RATE_LIMITED", message: "slow down" }, { "retry-after": "7" }),
      RateLimitedError,
      (e: RateLimitedError) => assert.equal(e.retryAfterSeconds, 7),
    ],
    [
      error(503, { code: "LEDGER_UNAVAILABLE", message: "later" }),
      ServiceUnavailableError,
      (e: ServiceUnavailableError) => assert.equal(e.code, "LEDGER_UNAVAILABLE"),
    ],
    [new Response("<html>bad gateway</html>", { status: 401 }), UnauthorizedError, () => {}],
  ];
  for (const [answer, type, check] of cases) {
    const { fetch, calls } = fakeFetch([answer]);
    const rejection = collect(client(fetch).streamReply(SESSION, { message: "hi" }));
    await assert.rejects(rejection, (thrown: Error) => {
      assert.ok(thrown instanceof type, `${thrown.name} is not ${type.name}`);
      check(thrown as never);
      return true;
    });
    assert.equal(calls.length, 1, "refusals are not retried");
  }
});

test("Retry-After as seconds or as an HTTP date", () => {
  assert.equal(parseRetryAfter("12"), 12);
  assert.equal(parseRetryAfter(" 3 "), 3);
  assert.equal(parseRetryAfter(new Date(Date.UTC(2030, 0, 1, 0, 0, 30)).toUTCString(), Date.UTC(2030, 0, 1)), 30);
  assert.equal(parseRetryAfter("soon"), undefined);
  assert.equal(parseRetryAfter(null), undefined);
});

test("aborting detaches: the iteration ends with the abort and nothing re-attaches", async () => {
  let controllerOf: ReadableStreamDefaultController<Uint8Array> | undefined;
  const hanging = new Response(
    new ReadableStream<Uint8Array>({
      start(controller) {
        controllerOf = controller;
        controller.enqueue(encoder.encode(MODEL));
      },
    }),
    { status: 200 },
  );
  const { fetch, calls } = fakeFetch([hanging]);
  const abort = new AbortController();
  const stream = client(fetch).streamReply(SESSION, { message: "hi" }, { signal: abort.signal, reconnectDelayMs: 1 });
  const seen: string[] = [];
  await assert.rejects(
    (async () => {
      for await (const event of stream) {
        seen.push(event.type);
        abort.abort();
        controllerOf?.error(new DOMException("aborted", "AbortError"));
      }
    })(),
  );
  assert.deepEqual(seen, ["model"]);
  assert.equal(calls.length, 1);
});

test("resume re-attaches after a given event; stop asks the service to end the reply", async () => {
  const { fetch, calls } = fakeFetch([
    sse(chunk(5, "rest") + COMPLETE(6)),
    new Response(JSON.stringify({ message: "Reply stopped", sessionId: SESSION }), { status: 200 }),
    error(404, { code: "NO_ACTIVE_REPLY", message: "none" }),
  ]);
  const api = client(fetch);
  const events = await collect(api.resumeReply(SESSION, 4));
  assert.equal(text(events), "rest");
  assert.equal(calls[0]?.headers["Last-Event-ID"], "4");
  assert.equal(await api.stopReply(SESSION), true);
  assert.equal(await api.stopReply(SESSION), false);
  assert.deepEqual(
    calls.slice(1).map((call) => [call.method, call.url]),
    [
      ["DELETE", `/api/chat/sessions/${SESSION}/stream`],
      ["DELETE", `/api/chat/sessions/${SESSION}/stream`],
    ],
  );
});

test("session ids are checked before they go into a URL", () => {
  const api = client(fakeFetch([]).fetch);
  assert.throws(() => api.streamReply("../../admin", { message: "x" }), TypeError);
  assert.throws(() => api.resumeReply("0123456789ABCDEF0123456", 0), TypeError);
});

/** A Storage in memory. */
function memoryStorage(): Storage {
  const items = new Map<string, string>();
  return {
    get length() {
      return items.size;
    },
    clear: () => items.clear(),
    getItem: (key) => items.get(key) ?? null,
    key: (index) => [...items.keys()][index] ?? null,
    removeItem: (key) => void items.delete(key),
    setItem: (key, value) => void items.set(key, value),
  };
}

test("a reload at any event resumes from the checkpoint with the same final text", async () => {
  const words = ["Lorem", " ipsum", " dolor", " sit", " amet", " 😀", " \\n", ' "q"'];
  const all = MODEL + words.map((word, index) => chunk(index + 2, word)).join("") + COMPLETE(words.length + 2);
  const frames = all.split("\n\n").filter((part) => part !== "").map((part) => `${part}\n\n`);
  for (let reloadAfter = 1; reloadAfter < frames.length; reloadAfter++) {
    const storage = memoryStorage();
    const checkpoints = new ReplyCheckpoints(storage);
    // The first page: reads `reloadAfter` events, then the page is gone.
    const first = fakeFetch([sse(frames.slice(0, reloadAfter).join(""), { drop: true })]);
    const checkpoint: ReplyCheckpoint = { sessionId: SESSION, message: "echo", lastEventId: 0, text: "" };
    const stream = client(first.fetch).streamReply(SESSION, { message: "echo" }, { maxReconnects: 0 });
    await assert.rejects(collect(checkpointed(stream, checkpoint, checkpoints)), NetworkError);

    // The reloaded page: resumes from what was saved.
    const saved = checkpoints.load();
    assert.ok(saved !== null, "a checkpoint is kept while the reply runs");
    assert.equal(saved.lastEventId, reloadAfter);
    const second = fakeFetch([
      (call) => sse(frames.slice(Number(call.headers["Last-Event-ID"])).join("")),
    ]);
    const resumed = client(second.fetch).resumeReply(SESSION, saved.lastEventId);
    const rest = await collect(checkpointed(resumed, saved, checkpoints));
    assert.equal(saved.text, words.join(""), `reloaded after event ${reloadAfter}`);
    assert.equal(rest.at(-1)?.type, "complete");
    assert.equal(checkpoints.load(), null, "cleared once the reply is over");
  }
});

test("the recommended route is asked for with the task and priority; a refusal is a typed error", async () => {
  const recommendation = {
    alias: "quick",
    model: "tiny",
    worstCase: 2.5,
    available: 10,
    primaryState: "closed",
    reason: "quick: its capabilities match the task `chat`.",
  };
  const { fetch, calls } = fakeFetch([
    new Response(JSON.stringify(recommendation), { status: 200, headers: { "content-type": "application/json" } }),
    error(402, {
      code: "INSUFFICIENT_CREDITS",
      message: "insufficient credits",
      balance: 1,
      available: 0.5,
      requiredCredits: 2.5,
    }),
  ]);
  const parley = client(fetch);
  assert.deepEqual(await parley.recommendModel("chat", "quality"), recommendation);
  assert.equal(calls[0]?.method, "POST");
  assert.equal(calls[0]?.url, "/api/models/recommend");
  assert.deepEqual(calls[0]?.body, { task: "chat", priority: "quality" });
  await assert.rejects(parley.recommendModel("chat", "cost"), InsufficientCreditsError);
});
