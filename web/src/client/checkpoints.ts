/**
 * Surviving a page reload mid-reply: a checkpoint of the running reply
 * (session, last event id, and the text shown so far) saved after every
 * event in `sessionStorage`. After the reload, `ParleyClient.resumeReply`
 * re-attaches after that event id, so the text continues with no gap and
 * no duplicate; `ended-unseen` means the reply finished meanwhile.
 */

import type { ReplyEvent, ModelEventData } from "./types.js";

export interface ReplyCheckpoint {
  sessionId: string;
  /** The message the reply answers (not stored by the service until the reply ends). */
  message: string;
  /** Id of the last event whose effect is in `text` (0: none yet). */
  lastEventId: number;
  text: string;
  model?: ModelEventData;
}

type KeyValueStorage = Pick<Storage, "getItem" | "setItem" | "removeItem">;

export class ReplyCheckpoints {
  private readonly storage: KeyValueStorage;
  private readonly key: string;

  constructor(storage: KeyValueStorage = sessionStorage, key = "parley.reply") {
    this.storage = storage;
    this.key = key;
  }

  load(): ReplyCheckpoint | null {
    const saved = this.storage.getItem(this.key);
    if (saved === null) return null;
    try {
      const value = JSON.parse(saved) as Partial<ReplyCheckpoint>;
      if (
        typeof value.sessionId === "string" &&
        typeof value.message === "string" &&
        typeof value.lastEventId === "number" &&
        typeof value.text === "string"
      ) {
        return value as ReplyCheckpoint;
      }
    } catch {
      // A damaged entry is as good as none.
    }
    this.clear();
    return null;
  }

  save(checkpoint: ReplyCheckpoint): void {
    this.storage.setItem(this.key, JSON.stringify(checkpoint));
  }

  clear(): void {
    this.storage.removeItem(this.key);
  }
}

/**
 * Passes `events` through, keeping `checkpoint` (text, model, last event
 * id) up to date and saved after each one; cleared when the reply ends.
 * The text and its event id are saved together, so a reload at any moment
 * resumes exactly after what was shown.
 */
export async function* checkpointed(
  events: AsyncIterable<ReplyEvent>,
  checkpoint: ReplyCheckpoint,
  store: ReplyCheckpoints,
): AsyncGenerator<ReplyEvent> {
  store.save(checkpoint);
  for await (const event of events) {
    switch (event.type) {
      case "model":
        checkpoint.model = event.data;
        checkpoint.lastEventId = event.id;
        break;
      case "chunk":
        checkpoint.text += event.data.text;
        checkpoint.lastEventId = event.id;
        break;
      case "complete":
      case "error":
      case "ended-unseen":
        store.clear();
        break;
      case "reattached":
        break;
    }
    if (event.type === "model" || event.type === "chunk") store.save(checkpoint);
    yield event;
  }
}
