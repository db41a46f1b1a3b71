import assert from "node:assert/strict";
import { test } from "node:test";

import { SseParser, readSse, type SseEvent } from "../../src/client/sse.js";

/** Text that broke the old client: every kind of line break, escaped
 * newlines, backslashes, quotes, SSE field names, emoji and CJK. */
const TORTURE =
  'line\nnext\r\nwin\rmac \\n not a newline \\\\ "quoted" data: fake\n\nevent: x\nid: 9\n😀👍🏽 中文字 end\u2028\u0000';

const encoder = new TextEncoder();

function parseAll(pieces: Uint8Array[]): { events: SseEvent[]; retries: number[]; comments: string[] } {
  const events: SseEvent[] = [];
  const retries: number[] = [];
  const comments: string[] = [];
  const parser = new SseParser({
    event: (event) => events.push(event),
    retry: (ms) => retries.push(ms),
    comment: (text) => comments.push(text),
  });
  for (const piece of pieces) parser.feed(piece);
  parser.end();
  return { events, retries, comments };
}

function splits(bytes: Uint8Array): Uint8Array[][] {
  const out: Uint8Array[][] = [];
  for (let cut = 0; cut <= bytes.length; cut++) out.push([bytes.slice(0, cut), bytes.slice(cut)]);
  return out;
}

/** A stream exercising every rule of the standard. */
const RULES =
  "\uFEFF" + // a leading byte order mark is ignored
  ": a comment\r\n" +
  "retry: 2500\n" +
  "retry: 25x\n" + // not all digits: ignored
  "id: 1\r" +
  "event: model\r" +
  "data: {\"a\":1}\r\r" +
  "data:no space\n" +
  "data:  two spaces\n" +
  "data\n" + // a field name alone: empty value
  "unknown: ignored\n" +
  "\n" +
  "id: 2\r\n" +
  "id\r\n" + // empty id resets the last event id
  "event: chunk\r\n" +
  "data: x\r\n" +
  "\r\n" +
  "id: 3\u0000\n" + // an id with NUL is ignored
  "data: \uFEFFkept\n" + // a later BOM is data
  "\n" +
  "event: lonely\n" +
  "\n" + // no data: nothing dispatched, event type reset
  "id: 4\n" +
  "\n" + // id only: updates the last id, no event
  "data: after\n" +
  "\n" +
  "data: cut off at the end";

const EXPECTED: SseEvent[] = [
  { type: "model", data: '{"a":1}', lastEventId: "1" },
  { type: "message", data: "no space\n two spaces\n", lastEventId: "1" },
  { type: "chunk", data: "x", lastEventId: "" },
  { type: "message", data: "\uFEFFkept", lastEventId: "" },
  { type: "message", data: "after", lastEventId: "4" },
];

test("every rule of the event-stream format", () => {
  const { events, retries, comments } = parseAll([encoder.encode(RULES)]);
  assert.deepEqual(events, EXPECTED);
  assert.deepEqual(retries, [2500]);
  assert.deepEqual(comments, [" a comment"]);
});

test("the same events whatever the split, even inside CRLF and UTF-8 sequences", () => {
  const bytes = encoder.encode(RULES);
  for (const pieces of splits(bytes)) {
    assert.deepEqual(parseAll(pieces).events, EXPECTED, `cut at ${pieces[0]?.length}`);
  }
  const byteByByte = [...bytes].map((byte) => Uint8Array.of(byte));
  assert.deepEqual(parseAll(byteByByte).events, EXPECTED);
});

/** Frames as parley-service writes them: id, event, one JSON data line. */
function frame(id: number, event: string, data: unknown): string {
  return `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

test("torture text split into two deltas at every point, frames cut at every byte, reassembles exactly", () => {
  const characters = [...TORTURE];
  for (let split = 0; split <= characters.length; split++) {
    const first = characters.slice(0, split).join("");
    const second = characters.slice(split).join("");
    const wire = encoder.encode(
      frame(1, "chunk", { text: first }) + ": ping\n\n" + frame(2, "chunk", { text: second }) + ": ping\n\n",
    );
    for (const pieces of splits(wire)) {
      const { events } = parseAll(pieces);
      assert.deepEqual(
        events.map((event) => event.lastEventId),
        ["1", "2"],
      );
      const text = events.map((event) => (JSON.parse(event.data) as { text: string }).text).join("");
      assert.equal(text, TORTURE, `delta split at ${split}, wire cut at ${pieces[0]?.length}`);
    }
  }
});

test("a multi-line data field keeps its lines, with CR, LF and CRLF all ending lines", () => {
  const { events } = parseAll([encoder.encode("data: one\rdata: two\r\ndata: three\ndata:\n\n")]);
  assert.deepEqual(events, [{ type: "message", data: "one\ntwo\nthree\n", lastEventId: "" }]);
});

test("readSse reads a response body and stops at its end", async () => {
  const wire = encoder.encode(frame(1, "chunk", { text: "a" }) + frame(2, "complete", {}) + "data: unfinished");
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      for (const byte of wire) controller.enqueue(Uint8Array.of(byte));
      controller.close();
    },
  });
  const events = [];
  for await (const event of readSse(body)) events.push(event);
  assert.deepEqual(
    events.map((event) => [event.type, event.lastEventId]),
    [
      ["chunk", "1"],
      ["complete", "2"],
    ],
  );
});
