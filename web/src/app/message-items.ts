/**
 * The items of a conversation, shared by the chat page and the console's
 * watch view: a user's message (plain text), a stored reply (Markdown), and
 * a reply being written (filled as it streams).
 */

import type { Message } from "../client/index.js";
import { h } from "./dom.js";
import { renderMarkdown } from "./render-markdown.js";

/** A message of the user; `author` is "You" on the chat page, the user's id in the console. */
export function userMessageItem(text: string, author: string): HTMLElement {
  return h("li", { class: "message user" }, h("h3", { class: "author" }, author), h("div", { class: "body plain" }, text));
}

/** A stored reply; `meta` is the line under it ("" for none). */
export function replyItem(message: Message, meta: string): HTMLElement {
  return h(
    "li",
    { class: "message assistant", "data-message-id": message.id },
    h("h3", { class: "author" }, "Assistant"),
    h("div", { class: "body" }, renderMarkdown(message.content)),
    h("p", { class: "meta" }, meta),
  );
}

/** What a stored message shows: a user's message or a reply with `replyMeta(message)` under it. */
export function messageItem(message: Message, author: string, replyMeta: (message: Message) => string): HTMLElement {
  return message.role === "user" ? userMessageItem(message.content, author) : replyItem(message, replyMeta(message));
}

/** A reply being written: busy until `finishReply`; its body is filled as it streams. */
export function streamingReplyItem(): { item: HTMLElement; author: HTMLElement; body: HTMLElement; meta: HTMLElement } {
  const author = h("h3", { class: "author" }, "Assistant");
  const body = h("div", { class: "body" });
  const meta = h("p", { class: "meta" }, "Writing…");
  const item = h("li", { class: "message assistant streaming", "aria-busy": "true" }, author, body, meta);
  return { item, author, body, meta };
}

export function finishReply(item: HTMLElement, meta: HTMLElement, text: string): void {
  item.classList.remove("streaming");
  item.removeAttribute("aria-busy");
  meta.textContent = text;
}

/** The author line of a reply once its model is known. */
export function modelAuthor(data: { model: string; fallbackApplied: boolean; downgraded: boolean }, downgradeNote: string): string {
  const notes = [data.fallbackApplied ? "fallback" : "", data.downgraded ? downgradeNote : ""]
    .filter((note) => note !== "")
    .join(", ");
  return `Assistant · ${data.model}${notes === "" ? "" : ` (${notes})`}`;
}
