/**
 * The supervisor console's live page: the replies in flight in the
 * caller's cohorts (admins: all), kept current by `liveReplies` (the
 * service pushes each start and end: no polling), the replies that ended
 * recently, and the watch view of the one chosen (`?watch=SESSION` in the
 * address, so it survives a reload).
 */

import type { ReplyInfo } from "../client/index.js";
import { h, replaceChildren } from "./dom.js";
import { replyOutcome, when } from "./messages.js";
import type { AppContext } from "./shell.js";
import { WatchPane } from "./watch.js";

const WATCH_PARAM = "watch";
const RECENTLY_ENDED_SHOWN = 8;
const SESSION_ID = /^[0-9a-f]{24}$/;

interface EndedReply {
  reply: ReplyInfo;
  outcome: string;
  endedAt: string;
}

export async function renderConsole(context: AppContext, main: HTMLElement): Promise<void> {
  const page = new ConsolePage(context, main);
  await page.start();
}

class ConsolePage {
  private readonly context: AppContext;
  /** In flight, by reply id, oldest first. */
  private readonly inFlight = new Map<string, ReplyInfo>();
  private ended: EndedReply[] = [];
  private readonly watch: WatchPane;

  private readonly heading = h("h2", { id: "live-heading" }, "Replies in flight");
  private readonly connection = h("p", { class: "connection help" }, "Connecting…");
  private readonly retryButton = h("button", { type: "button", class: "secondary", hidden: true }, "Reconnect");
  private readonly list = h("ul", { class: "reply-list", "aria-labelledby": "live-heading" });
  private readonly emptyState = h("p", { class: "empty" }, "No replies in flight right now.");
  private readonly inFlightItems = new Map<string, ReplyItem>();
  private readonly endedItems = new Map<string, ReplyItem>();
  private readonly endedHeading = h("h3", { id: "ended-heading", hidden: true }, "Recently ended");
  private readonly endedList = h("ul", { class: "reply-list ended", "aria-labelledby": "ended-heading", hidden: true });

  constructor(context: AppContext, main: HTMLElement) {
    this.context = context;
    this.watch = new WatchPane(context, (sessionId) => this.watched(sessionId));
    this.retryButton.addEventListener("click", () => void this.follow());
    main.classList.add("console");
    document.title = "Live replies · Parley";
    const scope =
      context.identity.role === "admin"
        ? "Every user's replies, as they are written."
        : `Replies of users in your cohorts (${context.identity.cohorts.join(", ") || "none"}), as they are written.`;
    replaceChildren(
      main,
      h(
        "div",
        { class: "console-layout" },
        h(
          "section",
          { class: "live", "aria-labelledby": "live-heading" },
          this.heading,
          h("p", { class: "help" }, scope),
          h("div", { class: "connection-row" }, this.connection, this.retryButton),
          this.emptyState,
          this.list,
          this.endedHeading,
          this.endedList,
        ),
        this.watch.element,
      ),
    );
    this.render();
  }

  async start(): Promise<void> {
    void this.context.refreshBalance();
    const wanted = new URLSearchParams(location.search).get(WATCH_PARAM);
    if (wanted !== null && SESSION_ID.test(wanted)) void this.watch.open(wanted, undefined, false);
    await this.follow();
  }

  /** Follows the live list until sign-out (it reconnects by itself; a button tries again after that). */
  private async follow(): Promise<void> {
    this.retryButton.hidden = true;
    this.connection.textContent = "Connecting…";
    try {
      for await (const event of this.context.client.liveReplies({ signal: this.context.signal })) {
        switch (event.type) {
          case "replies":
            this.inFlight.clear();
            for (const reply of event.replies) this.inFlight.set(reply.replyId, reply);
            this.connection.textContent = "Live: replies appear here as they start.";
            break;
          case "started":
            this.inFlight.set(event.reply.replyId, event.reply);
            this.context.announce(`${event.reply.userId} is getting a reply.`);
            break;
          case "ended":
            this.inFlight.delete(event.reply.replyId);
            this.ended = [
              { reply: event.reply, outcome: event.outcome, endedAt: new Date().toISOString() },
              ...this.ended.filter((item) => item.reply.replyId !== event.reply.replyId),
            ].slice(0, RECENTLY_ENDED_SHOWN);
            break;
          case "reconnecting":
            this.connection.textContent = "The connection was lost; reconnecting…";
            break;
          case "reconnected":
            this.connection.textContent = "Reconnected.";
            break;
        }
        this.render();
      }
    } catch (error) {
      if (this.context.signal.aborted) return;
      this.connection.textContent = `Not live: ${this.context.fail(error)}`;
      this.retryButton.hidden = false;
    }
  }

  private watched(sessionId: string | null): void {
    const url = new URL(location.href);
    if (sessionId === null) url.searchParams.delete(WATCH_PARAM);
    else url.searchParams.set(WATCH_PARAM, sessionId);
    history.replaceState(null, "", url);
    this.render();
  }

  /**
   * Brings both lists up to date in place: items that stay are kept (a
   * focused button keeps its focus while replies start and end around it).
   */
  private render(): void {
    const replies = [...this.inFlight.values()];
    this.heading.textContent = `Replies in flight (${replies.length})`;
    this.emptyState.hidden = replies.length > 0;
    const focusedReply = this.focusedReply();
    sync(this.list, this.inFlightItems, replies.map((reply) => reply.replyId), (replyId) => {
      const reply = this.inFlight.get(replyId) as ReplyInfo;
      return this.item(reply, h("time", { datetime: reply.startedAt }, `started ${when(reply.startedAt)}`));
    });
    this.endedHeading.hidden = this.ended.length === 0;
    this.endedList.hidden = this.ended.length === 0;
    sync(this.endedList, this.endedItems, this.ended.map((item) => item.reply.replyId), (replyId) => {
      const { reply, outcome, endedAt } = this.ended.find((item) => item.reply.replyId === replyId) as EndedReply;
      return this.item(reply, `${replyOutcome(outcome)}, `, h("time", { datetime: endedAt }, `ended ${when(endedAt)}`));
    });
    for (const [, item] of [...this.inFlightItems, ...this.endedItems]) item.update(this.watch.sessionId);
    // A reply that ended under the keyboard's focus: the focus follows it to the other list.
    if (focusedReply !== null && !this.inFlightItems.has(focusedReply)) {
      this.endedItems.get(focusedReply)?.button.focus();
    }
  }

  private focusedReply(): string | null {
    for (const [replyId, item] of this.inFlightItems) {
      if (item.element.contains(document.activeElement)) return replyId;
    }
    return null;
  }

  private item(reply: ReplyInfo, ...status: Array<Node | string>): ReplyItem {
    const label = h("span", {}, "Watch");
    const button = h("button", { type: "button" }, label, h("span", { class: "sr-only" }, ` ${reply.userId}'s chat`));
    button.addEventListener("click", () => void this.watch.open(reply.sessionId, reply));
    const cohorts = reply.userCohorts.length === 0 ? "no cohort" : reply.userCohorts.join(", ");
    const element = h(
      "li",
      { class: "reply-card" },
      h(
        "div",
        { class: "reply-card-text" },
        h("p", { class: "reply-who" }, h("strong", {}, reply.userId), h("span", { class: "help" }, ` · ${cohorts}`)),
        h("p", { class: "reply-what help" }, `Route ${reply.route} · `, ...status),
      ),
      button,
    );
    return {
      element,
      button,
      update(watchedSession) {
        const watching = watchedSession === reply.sessionId;
        if (watching) element.setAttribute("aria-current", "true");
        else element.removeAttribute("aria-current");
        button.classList.toggle("secondary", watching);
        label.textContent = watching ? "Watching" : "Watch";
      },
    };
  }
}

interface ReplyItem {
  element: HTMLElement;
  button: HTMLButtonElement;
  /** Shows whether this reply's chat is the one watched. */
  update(watchedSession: string | null): void;
}

/**
 * Makes `list` show the items of `keys` in that order: items of keys that
 * went are removed, new ones made by `make`, and those that stay are left
 * where they are unless the order changed.
 */
function sync(
  list: HTMLElement,
  items: Map<string, ReplyItem>,
  keys: string[],
  make: (key: string) => ReplyItem,
): void {
  const wanted = new Set(keys);
  for (const [key, item] of items) {
    if (!wanted.has(key)) {
      item.element.remove();
      items.delete(key);
    }
  }
  keys.forEach((key, index) => {
    let item = items.get(key);
    if (item === undefined) {
      item = make(key);
      items.set(key, item);
    }
    const at = list.children[index] ?? null;
    if (at !== item.element) list.insertBefore(item.element, at);
  });
}
