/**
 * The console's watch view: one session's conversation as stored, and its
 * reply being written, followed with `observeSession`. The service replays
 * the running reply from its first event whenever the observer connects, so
 * after a reconnection the view is rebuilt from the store and the reply
 * starts over: never shown twice. Every watch is recorded in the audit (and
 * shown to the session's owner) by the service.
 */

import {
  NotFoundError,
  type Message,
  type ObserveEvent,
  type ReplyInfo,
  type Session,
} from "../client/index.js";
import { h, replaceChildren } from "./dom.js";
import { finishReply, messageItem, modelAuthor, streamingReplyItem, userMessageItem } from "./message-items.js";
import { credits, replyOutcome } from "./messages.js";
import { renderMarkdown } from "./render-markdown.js";
import type { AppContext } from "./shell.js";

/** The reply being written, as this view shows it. */
interface WatchedReply {
  replyId: string;
  text: string;
  item: HTMLElement;
  author: HTMLElement;
  body: HTMLElement;
  meta: HTMLElement;
  renderScheduled: boolean;
}

/** One session being watched. */
interface Watch {
  sessionId: string;
  controller: AbortController;
  session: Session | null;
  reply: WatchedReply | null;
}

export class WatchPane {
  readonly element: HTMLElement;
  private readonly context: AppContext;
  /** Tells the page which session is watched (null: none), to mark it in the list. */
  private readonly onChange: (sessionId: string | null) => void;
  private watch: Watch | null = null;
  /** What each reply seen here ended with, by message id, shown under the stored reply. */
  private readonly endings = new Map<string, string>();

  /** Focused when a watch starts, so a screen reader hears whose. */
  private readonly title = h("h2", { id: "watch-title", tabindex: -1 }, "Not watching");
  private readonly details = h("p", { class: "watch-details help" });
  /** The live region of the watched reply: its state, said when it changes. */
  private readonly state = h("p", { class: "watch-state", role: "status" }, "Choose a reply to watch it as it is written.");
  private readonly stopButton = h("button", { type: "button", class: "secondary", hidden: true }, "Stop watching");
  private readonly againButton = h("button", { type: "button", hidden: true }, "Watch again");
  private readonly messages = h("ol", { class: "messages", "aria-labelledby": "watch-title", tabindex: 0, hidden: true });

  constructor(context: AppContext, onChange: (sessionId: string | null) => void) {
    this.context = context;
    this.onChange = onChange;
    this.stopButton.addEventListener("click", () => {
      this.close();
      this.title.focus();
    });
    this.againButton.addEventListener("click", () => {
      const sessionId = this.watch?.sessionId;
      if (sessionId !== undefined) void this.open(sessionId);
    });
    this.element = h(
      "section",
      { class: "watch", "aria-labelledby": "watch-title" },
      h("div", { class: "watch-head" }, this.title, h("div", { class: "watch-actions" }, this.againButton, this.stopButton)),
      this.details,
      this.state,
      this.messages,
    );
  }

  get sessionId(): string | null {
    return this.watch?.sessionId ?? null;
  }

  /**
   * Starts watching `sessionId` (`reply`: what the live list knows of it);
   * `focus` moves the focus to the view's title.
   */
  async open(sessionId: string, reply?: ReplyInfo, focus = true): Promise<void> {
    this.close();
    const controller = new AbortController();
    this.context.signal.addEventListener("abort", () => controller.abort(), { once: true, signal: controller.signal });
    const watch: Watch = { sessionId, controller, session: null, reply: null };
    this.watch = watch;
    this.onChange(sessionId);
    this.title.textContent = reply === undefined ? "Watching a chat" : `Watching ${reply.userId}`;
    this.details.textContent = reply === undefined ? "" : `Route ${reply.route}`;
    this.stopButton.hidden = false;
    this.againButton.hidden = true;
    this.setState("Connecting…");
    replaceChildren(this.messages);
    this.messages.hidden = false;
    if (focus) this.title.focus();
    try {
      await this.reload(watch);
      for await (const event of this.context.client.observeSession(sessionId, { signal: controller.signal })) {
        if (this.watch !== watch) return;
        await this.handle(watch, event);
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      this.setState(
        error instanceof NotFoundError
          ? "This chat does not exist, or its owner is not in your cohorts."
          : this.context.fail(error),
      );
      this.againButton.hidden = false;
    }
  }

  /** Stops watching (the service records the end of the observation). */
  close(): void {
    const watch = this.watch;
    if (watch === null) return;
    watch.controller.abort();
    this.watch = null;
    this.onChange(null);
    this.title.textContent = "Not watching";
    this.details.textContent = "";
    this.stopButton.hidden = true;
    this.againButton.hidden = true;
    this.messages.hidden = true;
    replaceChildren(this.messages);
    this.setState("Choose a reply to watch it as it is written.");
  }

  private async handle(watch: Watch, event: ObserveEvent): Promise<void> {
    const owner = watch.session?.userId ?? "The user";
    switch (event.type) {
      case "observe":
        if (event.data.state === "started") {
          this.startReply(watch, event.data.replyId, event.data.message);
          this.setState(`${owner} is getting a reply; it is shown as it is written.`);
        } else {
          const ending = replyOutcome(event.data.outcome);
          // The stored conversation now holds the reply (and the message it answers).
          await this.reload(watch);
          this.setState(`The reply ${ending}. Waiting for the next reply in this chat.`);
        }
        break;
      case "model": {
        const reply = this.replyOf(watch);
        reply.author.textContent = modelAuthor(event.data, "downgraded");
        this.details.textContent = `Route ${event.data.route} · model ${event.data.model}`;
        break;
      }
      case "chunk": {
        const reply = this.replyOf(watch);
        reply.text += event.data.text;
        this.scheduleRender(reply);
        break;
      }
      case "complete": {
        const reply = this.replyOf(watch);
        this.render(reply);
        const { usage, credits: cost, messageId } = event.data;
        if (watch.session?.messages.some((message) => message.id === messageId)) {
          // Stored before this view loaded the conversation: shown already.
          reply.item.remove();
          watch.reply = null;
          break;
        }
        const ending = `Completed: ${usage.outputTokens} tokens${cost === undefined ? "" : `, cost ${credits(cost.charged)} credits`}.`;
        this.endings.set(messageId, ending);
        reply.item.setAttribute("data-message-id", messageId);
        finishReply(reply.item, reply.meta, ending);
        this.setState("The reply is complete.");
        this.context.announce(`${owner}'s reply is complete: ${reply.text}`);
        break;
      }
      case "error": {
        const reply = this.replyOf(watch);
        this.render(reply);
        finishReply(reply.item, reply.meta, `Ended early: ${event.data.message} (${event.data.code}).`);
        this.setState(`The reply ended early (${event.data.code}).`);
        break;
      }
      case "too-slow":
        this.setState("This view fell too far behind the reply and the service disconnected it.");
        this.againButton.hidden = false;
        break;
      case "reconnecting":
        this.setState("The connection was lost; reconnecting…");
        break;
      case "reconnected":
        // The running reply comes again from its first event: start from the store.
        await this.reload(watch);
        this.setState("Reconnected; waiting for a reply in this chat.");
        break;
    }
  }

  /** Shows the stored conversation; drops the reply being written (it is sent again, or stored). */
  private async reload(watch: Watch): Promise<void> {
    const session = await this.context.client.getSession(watch.sessionId);
    if (this.watch !== watch) return;
    watch.session = session;
    watch.reply = null;
    this.title.textContent = `Watching ${session.userId}: ${session.title}`;
    document.title = `Watching ${session.userId} · Parley`;
    if (this.details.textContent === "") this.details.textContent = `Route ${session.route}`;
    const items = session.messages.map((message) => messageItem(message, session.userId, (reply) => this.ending(reply)));
    replaceChildren(
      this.messages,
      ...(items.length > 0 ? items : [h("li", { class: "empty" }, "No messages yet.")]),
    );
    this.messages.scrollTop = this.messages.scrollHeight;
    if (this.state.textContent === "Connecting…") this.setState("Waiting for a reply in this chat.");
  }

  private ending(message: Message): string {
    return this.endings.get(message.id) ?? (message.incomplete ? "Incomplete reply." : "");
  }

  /** Starts showing a reply, after the message it answers (`question`, when known). */
  private startReply(watch: Watch, replyId: string, question?: string): void {
    if (watch.reply !== null && watch.reply.replyId === replyId) {
      // The same reply from its first event again: start it over.
      watch.reply.text = "";
      this.render(watch.reply);
      return;
    }
    const { item, author, body, meta } = streamingReplyItem();
    this.messages.querySelector(":scope > .empty")?.remove();
    if (question !== undefined) {
      // Stored with the reply when it ends: until then only the hub has it.
      this.messages.append(userMessageItem(question, watch.session?.userId ?? "The user"));
    }
    this.messages.append(item);
    watch.reply = { replyId, text: "", item, author, body, meta, renderScheduled: false };
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  /** The reply being written (started by its `observe` event; made here if that was missed). */
  private replyOf(watch: Watch): WatchedReply {
    if (watch.reply === null) this.startReply(watch, "");
    return watch.reply as WatchedReply;
  }

  private scheduleRender(reply: WatchedReply): void {
    if (reply.renderScheduled) return;
    reply.renderScheduled = true;
    requestAnimationFrame(() => {
      reply.renderScheduled = false;
      this.render(reply);
    });
  }

  private render(reply: WatchedReply): void {
    const list = this.messages;
    const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 120;
    replaceChildren(reply.body, renderMarkdown(reply.text));
    if (follow) list.scrollTop = list.scrollHeight;
  }

  private setState(text: string): void {
    if (this.state.textContent !== text) this.state.textContent = text;
  }
}
