/**
 * A server-sent events parser following the WHATWG HTML "event stream"
 * rules (https://html.spec.whatwg.org/multipage/server-sent-events.html):
 * UTF-8 decoded in streaming mode (so a chunk may end inside a multi-byte
 * character), one leading byte order mark ignored, lines ended by CR, LF or
 * CRLF (a CRLF may be split across chunks), comments, multi-line `data`,
 * and the `event`, `id` and `retry` fields. Bytes may arrive split anywhere.
 *
 * It never searches the text for `data:` patterns: every line is a field,
 * and an event is dispatched only at a blank line.
 */

/** One dispatched event. */
export interface SseEvent {
  /** The `event` field, or "message" when none was given. */
  type: string;
  /** The `data` lines joined with "\n". */
  data: string;
  /** The last event id seen so far (the `id` field persists across events). */
  lastEventId: string;
}

export interface SseHandlers {
  event(event: SseEvent): void;
  /** A `retry` field: the reconnection time the server asks for, in ms. */
  retry?(milliseconds: number): void;
  /** A comment line (`: ping`), without its leading colon. */
  comment?(text: string): void;
}

const LF = 10;
const CR = 13;

export class SseParser {
  private readonly decoder = new TextDecoder("utf-8");
  private readonly handlers: SseHandlers;
  /** Text of the current line not yet ended. */
  private pending = "";
  /** The previous character was a CR: a following LF belongs to it. */
  private afterCr = false;
  private data = "";
  private eventType = "";
  private idBuffer = "";
  /** The id of the last dispatched event (or set by an `id` field). */
  lastEventId = "";

  constructor(handlers: SseHandlers) {
    this.handlers = handlers;
  }

  /** Feeds the next bytes of the stream. */
  feed(bytes: Uint8Array): void {
    this.push(this.decoder.decode(bytes, { stream: true }));
  }

  /**
   * The stream ended. An event not yet ended by a blank line is discarded,
   * as the standard says: a cut connection never delivers half an event.
   */
  end(): void {
    this.push(this.decoder.decode());
    this.pending = "";
    this.data = "";
    this.eventType = "";
  }

  private push(text: string): void {
    let start = 0;
    for (let index = 0; index < text.length; index++) {
      const code = text.charCodeAt(index);
      if (this.afterCr) {
        this.afterCr = false;
        if (code === LF) {
          start = index + 1;
          continue;
        }
      }
      if (code === CR || code === LF) {
        const line = this.pending + text.slice(start, index);
        this.pending = "";
        this.afterCr = code === CR;
        start = index + 1;
        this.line(line);
      }
    }
    this.pending += text.slice(start);
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.charCodeAt(0) === 0x3a /* : */) {
      this.handlers.comment?.(line.slice(1));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data += value + "\n";
        break;
      case "id":
        if (!value.includes("\u0000")) this.idBuffer = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.handlers.retry?.(Number(value));
        break;
      default:
        // Unknown fields are ignored.
        break;
    }
  }

  private dispatch(): void {
    this.lastEventId = this.idBuffer;
    if (this.data === "") {
      this.eventType = "";
      return;
    }
    const event: SseEvent = {
      type: this.eventType === "" ? "message" : this.eventType,
      data: this.data.endsWith("\n") ? this.data.slice(0, -1) : this.data,
      lastEventId: this.lastEventId,
    };
    this.data = "";
    this.eventType = "";
    this.handlers.event(event);
  }
}

/**
 * The events of a response body, read with its `ReadableStream` reader.
 * Ends when the body ends; throws what reading throws (a dropped connection,
 * or an `AbortError` when the request's signal is aborted). `onComment`
 * hears comments such as the service's `: ping` keep-alives.
 */
export async function* readSse(
  body: ReadableStream<Uint8Array>,
  onRetry?: (milliseconds: number) => void,
  onComment?: (text: string) => void,
): AsyncGenerator<SseEvent> {
  const queue: SseEvent[] = [];
  const parser = new SseParser({
    event: (event) => queue.push(event),
    retry: onRetry,
    comment: onComment,
  });
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        parser.end();
      } else {
        parser.feed(value);
      }
      while (queue.length > 0) {
        yield queue.shift() as SseEvent;
      }
      if (done) return;
    }
  } finally {
    // Stops the download when the consumer leaves early.
    reader.cancel().catch(() => {});
  }
}
