import assert from "node:assert/strict";
import { test } from "node:test";

import {
  ForbiddenError,
  NetworkError,
  NotFoundError,
  type LiveEvent,
  type ObserveEvent,
  type ReplyInfo,
} from "../../src/client/index.js";
import { COMPLETE, MODEL, SESSION, chunk, client, collect, error, fakeFetch, frame, sse, unnumbered } from "./fakes.js";

const observe = (replyId: string, state: "started" | "ended", outcome?: string): string =>
  unnumbered("observe", { sessionId: SESSION, userId: "ann", replyId, state, ...(outcome ? { outcome } : {}) });

function reply(replyId: string, userId = "ann"): ReplyInfo {
  return {
    replyId,
    sessionId: SESSION,
    userId,
    userCohorts: ["class-a"],
    route: "default",
    message: "what is a closure?",
    startedAt: "2030-01-01T09:00:00Z",
  };
}

/** The text a view shows: it starts over when a reply starts (again, after a reconnection). */
function shownText(events: ObserveEvent[]): string {
  let text = "";
  for (const event of events) {
    if (event.type === "observe" && event.data.state === "started") text = "";
    if (event.type === "chunk") text += event.data.text;
  }
  return text;
}

/** Reads events until `stop` says so (then leaves: the stream is closed). */
async function until<T>(events: AsyncIterable<T>, stop: (event: T) => boolean): Promise<T[]> {
  const seen: T[] = [];
  for await (const event of events) {
    seen.push(event);
    if (stop(event)) break;
  }
  return seen;
}

test("an observer gets each reply framed by observe events, with the owner's events in between", async () => {
  const { fetch, calls } = fakeFetch([
    sse(
      observe("r1", "started") +
        MODEL +
        chunk(2, "Hello") +
        ": ping\n\n" +
        chunk(3, " there") +
        COMPLETE(4) +
        observe("r1", "ended", "completed") +
        ": ping\n\n" +
        observe("r2", "started") +
        MODEL +
        chunk(2, "Again"),
    ),
  ]);
  const events = await until(client(fetch).observeSession(SESSION), (event) => event.type === "chunk" && event.data.text === "Again");
  assert.deepEqual(
    events.map((event) => event.type),
    ["observe", "model", "chunk", "chunk", "complete", "observe", "observe", "model", "chunk"],
  );
  assert.deepEqual(events[5], {
    type: "observe",
    data: { sessionId: SESSION, userId: "ann", replyId: "r1", state: "ended", outcome: "completed" },
  });
  assert.equal(shownText(events), "Again");
  assert.equal(calls.length, 1);
  assert.equal(calls[0]?.url, `/api/chat/sessions/${SESSION}/observe`);
  assert.equal(calls[0]?.method, "GET");
  assert.equal(calls[0]?.headers["Accept"], "text/event-stream");
  assert.equal(calls[0]?.headers["Authorization"], "Bearer T0KEN");
  assert.equal(calls[0]?.headers["Last-Event-ID"], undefined, "observation has no resume: it starts over");
});

test("a dropped connection reconnects, and the running reply starts over: shown once, not twice", async () => {
  const { fetch, calls } = fakeFetch([
    sse(observe("r1", "started") + MODEL + chunk(2, "one") + chunk(3, " tw"), { drop: true }),
    new TypeError("connection refused"),
    error(503, { code: "SHUTTING_DOWN", message: "draining" }),
    sse(observe("r1", "started") + MODEL + chunk(2, "one") + chunk(3, " two") + COMPLETE(4) + observe("r1", "ended", "completed")),
  ]);
  const events = await until(
    client(fetch).observeSession(SESSION, { reconnectDelayMs: 1 }),
    (event) => event.type === "observe" && event.data.state === "ended",
  );
  assert.deepEqual(
    events.filter((event) => event.type === "reconnecting" || event.type === "reconnected"),
    [
      { type: "reconnecting", attempt: 1, delayMs: 1 },
      { type: "reconnecting", attempt: 2, delayMs: 2 },
      { type: "reconnecting", attempt: 3, delayMs: 4 },
      { type: "reconnected" },
    ],
  );
  assert.equal(shownText(events), "one two");
  assert.equal(calls.length, 4);
});

test("the observer's own error (too slow) is told from the reply's error, and ends the stream", async () => {
  const { fetch, calls } = fakeFetch([
    sse(
      observe("r1", "started") +
        MODEL +
        frame(2, "error", { code: "CANCELLED", message: "stopped by the user" }) +
        observe("r1", "ended", "abandoned") +
        observe("r2", "started") +
        MODEL +
        unnumbered("error", { code: "OBSERVER_TOO_SLOW", message: "fell behind" }),
    ),
  ]);
  const events = await collect(client(fetch).observeSession(SESSION, { reconnectDelayMs: 1 }));
  assert.deepEqual(
    events.map((event) => event.type),
    ["observe", "model", "error", "observe", "observe", "model", "too-slow"],
  );
  assert.deepEqual(events[2], { type: "error", id: 2, data: { code: "CANCELLED", message: "stopped by the user" } });
  assert.deepEqual(events.at(-1), { type: "too-slow", data: { code: "OBSERVER_TOO_SLOW", message: "fell behind" } });
  assert.equal(calls.length, 1, "a cut observer does not come back by itself");
});

test("refusals are typed errors, on the first request and on a reconnection", async () => {
  const hidden = fakeFetch([error(404, { code: "SESSION_NOT_FOUND", message: "no such session" })]);
  await assert.rejects(collect(client(hidden.fetch).observeSession(SESSION)), NotFoundError);

  const off = fakeFetch([error(403, { code: "OBSERVATION_DISABLED", message: "off" })]);
  await assert.rejects(collect(client(off.fetch).observeSession(SESSION)), (thrown: Error) => {
    assert.ok(thrown instanceof ForbiddenError);
    assert.equal(thrown.code, "OBSERVATION_DISABLED");
    return true;
  });

  const deleted = fakeFetch([
    sse(observe("r1", "started") + MODEL, { drop: true }),
    error(404, { code: "SESSION_NOT_FOUND", message: "deleted meanwhile" }),
  ]);
  await assert.rejects(collect(client(deleted.fetch).observeSession(SESSION, { reconnectDelayMs: 1 })), NotFoundError);
  assert.equal(deleted.calls.length, 2);

  assert.throws(() => client(fakeFetch([]).fetch).observeSession("../audit"), TypeError);
});

test("pings count as a working connection; without them reconnecting gives up after maxReconnects", async () => {
  const { fetch, calls } = fakeFetch([sse(": ping\n\n"), sse(": ping\n\n"), new TypeError("down")]);
  const seen: ObserveEvent[] = [];
  await assert.rejects(
    (async () => {
      for await (const event of client(fetch).observeSession(SESSION, { reconnectDelayMs: 1, maxReconnects: 1 })) {
        seen.push(event);
      }
    })(),
    NetworkError,
  );
  assert.deepEqual(
    seen.map((event) => (event.type === "reconnecting" ? `reconnecting ${event.attempt}` : event.type)),
    // Without the ping the second drop would be failure 2 (over the limit at once).
    ["reconnecting 1", "reconnected", "reconnecting 1"],
  );
  assert.equal(calls.length, 3);
});

test("closing with the signal stops reading and never reconnects", async () => {
  const { fetch, calls } = fakeFetch([sse(observe("r1", "started") + MODEL + chunk(2, "a") + chunk(3, "b"), { drop: true })]);
  const close = new AbortController();
  const seen: string[] = [];
  await assert.rejects(
    (async () => {
      for await (const event of client(fetch).observeSession(SESSION, { signal: close.signal, reconnectDelayMs: 1 })) {
        seen.push(event.type);
        if (event.type === "model") close.abort();
      }
    })(),
  );
  assert.deepEqual(seen, ["observe", "model"]);
  assert.equal(calls.length, 1);
});

test("a console's live list: the whole list, then replies starting and ending; a reconnection sends the list again", async () => {
  const { fetch, calls } = fakeFetch([
    sse(
      unnumbered("replies", { replies: [reply("r1")] }) +
        unnumbered("started", { reply: reply("r2", "bob") }) +
        unnumbered("something-new", { what: 1 }) +
        unnumbered("started", { reply: { replyId: "r3" } }) +
        "event: started\ndata: not json\n\n" +
        unnumbered("ended", { reply: reply("r1"), outcome: "completed" }),
      { drop: true },
    ),
    sse(unnumbered("replies", { replies: [reply("r2", "bob"), reply("r4", "cy")] })),
  ]);
  const events = await until(
    client(fetch).liveReplies({ reconnectDelayMs: 1 }),
    (event) => event.type === "replies" && event.replies.length === 2,
  );
  assert.deepEqual(
    events.map((event) => event.type),
    ["replies", "started", "ended", "reconnecting", "reconnected", "replies"],
    "unknown and malformed events are skipped",
  );
  const list = new Map<string, ReplyInfo>();
  const outcomes: string[] = [];
  for (const event of events as LiveEvent[]) {
    if (event.type === "replies") {
      list.clear();
      for (const item of event.replies) list.set(item.replyId, item);
    } else if (event.type === "started") list.set(event.reply.replyId, event.reply);
    else if (event.type === "ended") {
      list.delete(event.reply.replyId);
      outcomes.push(`${event.reply.userId} ${event.outcome}`);
    }
  }
  assert.deepEqual([...list.keys()], ["r2", "r4"]);
  assert.deepEqual(outcomes, ["ann completed"]);
  assert.deepEqual(
    calls.map((call) => [call.url, call.headers["Accept"]]),
    [
      ["/api/observe/live", "text/event-stream"],
      ["/api/observe/live", "text/event-stream"],
    ],
  );
});

test("users are refused the live list (403)", async () => {
  const { fetch } = fakeFetch([error(403, { code: "FORBIDDEN", message: "only supervisors and admins observe replies" })]);
  await assert.rejects(collect(client(fetch).liveReplies()), ForbiddenError);
});

test("the audit, another user's balance and usage, and a grant", async () => {
  const ok = (body: unknown): Response => new Response(JSON.stringify(body), { status: 200 });
  const balance = { userId: "ann b", balance: 125, held: 0, available: 125 };
  const { fetch, calls } = fakeFetch([
    ok({ observations: [], pagination: { total: 0, page: 2, limit: 5, pages: 0 } }),
    ok({ observations: [], pagination: { total: 0, page: 1, limit: 20, pages: 0 } }),
    ok(balance),
    ok({ userId: "me", balance: 1, held: 0, available: 1 }),
    ok({ userId: "ann b", page: 3, limit: 10, records: [] }),
    ok(balance),
  ]);
  const api = client(fetch);
  assert.equal((await api.observationAudit({ userId: "ann b", page: 2, limit: 5 })).pagination.page, 2);
  await api.observationAudit({ userId: "" });
  assert.deepEqual(await api.balance("ann b"), balance);
  await api.balance();
  await api.usage({ userId: "ann b", page: 3, limit: 10 });
  assert.deepEqual(await api.grantCredits("ann b", 25.5), balance);
  assert.deepEqual(
    calls.map((call) => [call.method, call.url, call.body]),
    [
      ["GET", "/api/observe/audit?userId=ann+b&page=2&limit=5", undefined],
      ["GET", "/api/observe/audit", undefined],
      ["GET", "/api/credits/balance?userId=ann+b", undefined],
      ["GET", "/api/credits/balance", undefined],
      ["GET", "/api/credits/usage?userId=ann+b&page=3&limit=10", undefined],
      ["POST", "/api/admin/credits/grant", { userId: "ann b", credits: 25.5 }],
    ],
  );
});
