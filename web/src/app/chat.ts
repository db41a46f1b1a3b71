/**
 * The chat page: the caller's chats (new, open, rename, delete), the open
 * conversation with replies streaming in, the model picker with prices (the
 * route the service recommends for chat picked first, and a note when a
 * route's first model is unavailable), a stop button, and what every reply cost. A reply running when the page is
 * reloaded continues where it was (`ReplyCheckpoints`).
 */

import {
  ReplyCheckpoints,
  ReplyInProgressError,
  checkpointed,
  type Message,
  type ModelInfo,
  type ReplyCheckpoint,
  type ReplyEvent,
  type ReplyStream,
  type Session,
  type SessionObserver,
  type SessionSummary,
} from "../client/index.js";
import { h, replaceChildren } from "./dom.js";
import { finishReply, messageItem, modelAuthor, streamingReplyItem, userMessageItem } from "./message-items.js";
import { credits, describeReplyError, observersSummary, personWithRole, when } from "./messages.js";
import { renderMarkdown } from "./render-markdown.js";
import type { AppContext } from "./shell.js";

const SESSION_PARAM = "session";
const NEW_CHAT_TITLE = "New Chat";
const TITLE_FROM_MESSAGE_CHARS = 60;
/** What the model picker starts on: the service's pick for this task and priority. */
const RECOMMEND_TASK = "chat";
const RECOMMEND_PRIORITY = "quality";
const PRIMARY_OPEN_NOTE = "Its first model is unavailable for now; the next one answers.";

/** A reply being shown as it streams. */
interface LiveReply {
  stream: ReplyStream;
  checkpoint: ReplyCheckpoint;
  /** The user's message and the reply, until the stored ones replace them. */
  elements: HTMLElement[];
  author: HTMLElement;
  body: HTMLElement;
  meta: HTMLElement;
  item: HTMLElement;
  renderScheduled: boolean;
}

export async function renderChat(context: AppContext, main: HTMLElement): Promise<void> {
  const page = new ChatPage(context, main);
  await page.start();
}

class ChatPage {
  private readonly context: AppContext;
  private readonly checkpoints = new ReplyCheckpoints();
  private sessions: SessionSummary[] = [];
  private current: Session | null = null;
  private models: ModelInfo[] = [];
  /** The route the service recommends, when it could recommend one. */
  private recommended: string | null = null;
  private live: LiveReply | null = null;
  /** What each reply of this visit cost, by message id. */
  private readonly costs = new Map<string, number>();

  private readonly sessionList = h("ul", { class: "session-list" });
  private readonly sidebarToggle = h(
    "button",
    { type: "button", class: "sidebar-toggle secondary", "aria-expanded": "false", "aria-controls": "sidebar" },
    "Chats",
  );
  private readonly sidebar = h("nav", { id: "sidebar", class: "sidebar", "aria-labelledby": "chats-heading" });
  /** Focused when a chat is opened, so a screen reader hears which. */
  private readonly title = h("h2", { id: "conversation-title", class: "conversation-title", tabindex: -1 });
  private readonly titleActions = h("div", { class: "title-actions" });
  /** Who watched this conversation: one folded line, opened on demand. */
  private readonly observedBy = h("details", { class: "observed-by", hidden: true });
  /** Scrolls by itself; focusable so a keyboard can scroll it. */
  private readonly messageList = h("ol", { class: "messages", "aria-labelledby": "conversation-title", tabindex: 0 });
  private readonly emptyState = h("p", { class: "empty" });
  private readonly notice = h("div", { class: "notice", role: "alert", hidden: true });
  private readonly routePicker = h("select", {
    id: "route",
    name: "route",
    "aria-describedby": "route-note",
    on: { change: () => this.showRouteNote() },
  });
  private readonly routeNote = h("span", { id: "route-note", class: "route-note", hidden: true });
  private readonly input = h("textarea", {
    id: "message",
    name: "message",
    rows: 3,
    required: true,
    "aria-describedby": "message-help",
    placeholder: "Ask anything",
  });
  private readonly sendButton = h("button", { type: "submit", class: "send" }, "Send");
  private readonly stopButton = h("button", { type: "button", class: "stop danger", hidden: true }, "Stop");

  /** Whether the message list is scrolled to its end (and should stay there). */
  private atEnd = true;

  constructor(context: AppContext, main: HTMLElement) {
    this.context = context;
    this.messageList.addEventListener("scroll", () => (this.atEnd = this.nearEnd()), { passive: true });
    // A narrower window rewraps the text: keep the end in view if it was.
    new ResizeObserver(() => this.scrollToEnd(this.atEnd)).observe(this.messageList);
    main.classList.add("chat");
    const newChat = h("button", { type: "button", class: "new-chat" }, "New chat");
    newChat.addEventListener("click", () => void this.newChat());
    replaceChildren(
      this.sidebar,
      h("div", { class: "sidebar-head" }, h("h2", { id: "chats-heading" }, "Chats"), newChat),
      this.sessionList,
    );
    this.sidebarToggle.addEventListener("click", () => this.toggleSidebar());
    const composer = h(
      "form",
      { class: "composer", "aria-label": "Send a message" },
      h("div", { class: "route-row" }, h("label", { for: "route" }, "Model"), this.routePicker, this.routeNote),
      h("label", { for: "message", class: "sr-only" }, "Message"),
      this.input,
      h(
        "div",
        { class: "composer-actions" },
        h("p", { id: "message-help", class: "help" }, "Enter sends; Shift+Enter starts a new line."),
        this.stopButton,
        this.sendButton,
      ),
    );
    composer.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.send();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        composer.requestSubmit();
      }
    });
    this.stopButton.addEventListener("click", () => void this.stop());
    const conversation = h(
      "section",
      { class: "conversation", "aria-labelledby": "conversation-title" },
      h("div", { class: "conversation-head" }, this.title, this.titleActions, this.observedBy),
      this.emptyState,
      this.messageList,
      this.notice,
      composer,
    );
    replaceChildren(main, h("div", { class: "chat-layout" }, this.sidebarToggle, this.sidebar, conversation));
  }

  async start(): Promise<void> {
    const [models, recommended, sessions] = await Promise.all([
      this.context.client.listModels().catch((error: unknown) => this.failed(error, [] as ModelInfo[])),
      // Nothing affordable or a failure: the deployment's default route instead.
      this.context.client
        .recommendModel(RECOMMEND_TASK, RECOMMEND_PRIORITY)
        .then((recommendation) => recommendation.alias)
        .catch(() => null),
      this.context.client.listSessions().catch((error: unknown) => this.failed(error, null)),
      this.context.refreshBalance(),
    ]);
    this.models = models;
    this.recommended = recommended;
    this.sessions = sessions?.sessions ?? [];
    this.renderRoutes();
    this.renderSessionList();
    const checkpoint = this.checkpoints.load();
    const wanted = checkpoint?.sessionId ?? new URLSearchParams(location.search).get(SESSION_PARAM);
    const opening = this.sessions.find((session) => session.sessionId === wanted) ?? this.sessions[0];
    if (opening === undefined) {
      this.checkpoints.clear();
      this.showConversation(null);
      return;
    }
    await this.open(opening.sessionId, false);
    if (checkpoint !== null && checkpoint.sessionId === this.current?.sessionId) {
      const stream = this.context.client.resumeReply(checkpoint.sessionId, checkpoint.lastEventId, {
        signal: this.context.signal,
      });
      await this.follow(stream, checkpoint);
    } else {
      this.checkpoints.clear();
    }
  }

  private failed<T>(error: unknown, fallback: T): T {
    this.say(this.context.fail(error));
    return fallback;
  }

  // ---- sessions -------------------------------------------------------

  private renderSessionList(): void {
    this.sidebarToggle.textContent = `Chats (${this.sessions.length})`;
    if (this.sessions.length === 0) {
      replaceChildren(this.sessionList, h("li", { class: "help" }, "No chats yet."));
      return;
    }
    replaceChildren(
      this.sessionList,
      ...this.sessions.map((session) => {
        const open = h(
          "a",
          {
            href: `?${SESSION_PARAM}=${session.sessionId}`,
            class: "session-link",
            "aria-current": session.sessionId === this.current?.sessionId ? "page" : undefined,
          },
          session.title,
        );
        open.addEventListener("click", (event) => {
          event.preventDefault();
          void this.open(session.sessionId, true);
        });
        return h("li", {}, open);
      }),
    );
  }

  private async refreshSessions(): Promise<void> {
    try {
      this.sessions = (await this.context.client.listSessions()).sessions;
    } catch (error) {
      this.say(this.context.fail(error));
    }
    this.renderSessionList();
  }

  private async newChat(title = NEW_CHAT_TITLE): Promise<Session | null> {
    if (this.live !== null) return null;
    try {
      const session = await this.context.client.createSession({ title, route: this.routePicker.value || undefined });
      this.sessions.unshift(session);
      this.showConversation(session);
      this.input.focus();
      return session;
    } catch (error) {
      this.say(this.context.fail(error));
      return null;
    }
  }

  private async open(sessionId: string, focus: boolean): Promise<void> {
    if (this.live !== null) return;
    try {
      this.showConversation(await this.context.client.getSession(sessionId));
      this.collapseSidebar();
      if (focus) this.title.focus();
    } catch (error) {
      this.say(this.context.fail(error));
      await this.refreshSessions();
    }
  }

  private showConversation(session: Session | null): void {
    this.current = session;
    this.clearNotice();
    const url = new URL(location.href);
    if (session === null) url.searchParams.delete(SESSION_PARAM);
    else url.searchParams.set(SESSION_PARAM, session.sessionId);
    history.replaceState(null, "", url);
    this.renderSessionList();
    this.showHeader();
    this.showObservers(session?.observedBy ?? []);
    if (session === null) {
      replaceChildren(this.messageList);
      this.emptyState.textContent = "Start a new chat, or just send a message.";
      this.emptyState.hidden = false;
      return;
    }
    replaceChildren(this.messageList, ...session.messages.map((message) => this.messageItem(message)));
    this.emptyState.textContent = "No messages yet. Say something below.";
    this.emptyState.hidden = session.messages.length > 0;
    this.routePicker.value = this.models.some((model) => model.alias === session.route)
      ? session.route
      : this.defaultRoute();
    this.showRouteNote();
    this.scrollToEnd(true);
  }

  private startRename(): void {
    const session = this.current;
    if (session === null) return;
    const field = h("input", { id: "rename", name: "title", value: session.title, required: true, maxlength: 200 });
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    const form = h(
      "form",
      { class: "rename", "aria-label": "Rename chat" },
      h("label", { for: "rename", class: "sr-only" }, "New title"),
      field,
      h("button", { type: "submit" }, "Save"),
      cancel,
    );
    const restore = (): void => {
      this.showHeader();
      this.titleActions.querySelector("button")?.focus();
    };
    cancel.addEventListener("click", restore);
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") restore();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.context.client
        .renameSession(session.sessionId, field.value)
        .then((renamed) => {
          session.title = renamed.title;
          const listed = this.sessions.find((item) => item.sessionId === session.sessionId);
          if (listed) listed.title = renamed.title;
          this.renderSessionList();
          restore();
          this.context.announce(`Chat renamed to ${renamed.title}`);
        })
        .catch((error: unknown) => this.say(this.context.fail(error)));
    });
    replaceChildren(this.titleActions, form);
    this.title.hidden = true;
    field.focus();
    field.select();
  }

  /** The conversation's title and its Rename and Delete buttons. */
  private showHeader(): void {
    const session = this.current;
    this.title.hidden = false;
    if (session === null) {
      this.title.textContent = "No chat open";
      replaceChildren(this.titleActions);
      document.title = "Parley";
      return;
    }
    this.title.textContent = session.title;
    document.title = `${session.title} · Parley`;
    const rename = h("button", { type: "button", class: "secondary" }, "Rename");
    rename.addEventListener("click", () => this.startRename());
    const remove = h("button", { type: "button", class: "secondary danger" }, "Delete");
    remove.addEventListener("click", () => this.confirmDelete());
    replaceChildren(this.titleActions, rename, remove);
  }

  private showObservers(observers: SessionObserver[]): void {
    this.observedBy.hidden = observers.length === 0;
    if (observers.length === 0) {
      replaceChildren(this.observedBy);
      return;
    }
    const open = this.observedBy.open;
    replaceChildren(
      this.observedBy,
      h("summary", {}, `Observed by ${observersSummary(observers)}`),
      h(
        "ul",
        {},
        ...observers.map((observer) =>
          h(
            "li",
            {},
            `${personWithRole(observer.observerId, observer.observerRole)}: `,
            h("time", { datetime: observer.startedAt }, when(observer.startedAt)),
            " – ",
            observer.endedAt === undefined
              ? "watching now"
              : h("time", { datetime: observer.endedAt }, when(observer.endedAt)),
          ),
        ),
      ),
      h(
        "p",
        { class: "help" },
        "Supervisors of your cohorts and administrators may watch replies as they are written. Each time is listed here.",
      ),
    );
    this.observedBy.open = open;
  }

  /** After a reply: who watched it may have changed. */
  private async refreshObservers(): Promise<void> {
    const session = this.current;
    if (session === null) return;
    try {
      const fresh = await this.context.client.getSession(session.sessionId);
      if (this.current !== session) return;
      session.observedBy = fresh.observedBy;
      this.showObservers(fresh.observedBy ?? []);
    } catch (error) {
      // Not worth a notice: the list shows again when the chat is opened.
      this.context.fail(error);
    }
  }

  private confirmDelete(): void {
    const session = this.current;
    if (session === null || this.live !== null) return;
    const confirm = h("button", { type: "button", class: "danger" }, "Delete chat");
    const cancel = h("button", { type: "button", class: "secondary" }, "Keep it");
    replaceChildren(
      this.titleActions,
      h("p", { class: "confirm", role: "alert" }, `Delete “${session.title}” and its messages?`),
      confirm,
      cancel,
    );
    cancel.addEventListener("click", () => {
      this.showHeader();
      this.titleActions.querySelector("button")?.focus();
    });
    confirm.addEventListener("click", () => {
      void this.context.client
        .deleteSession(session.sessionId)
        .then(async () => {
          this.sessions = this.sessions.filter((item) => item.sessionId !== session.sessionId);
          this.context.announce(`Chat “${session.title}” deleted`);
          const next = this.sessions[0];
          if (next === undefined) this.showConversation(null);
          else await this.open(next.sessionId, false);
          this.title.focus();
        })
        .catch((error: unknown) => this.say(this.context.fail(error)));
    });
    confirm.focus();
  }

  private toggleSidebar(): void {
    const open = this.sidebarToggle.getAttribute("aria-expanded") !== "true";
    this.sidebarToggle.setAttribute("aria-expanded", String(open));
    this.sidebar.classList.toggle("open", open);
  }

  private collapseSidebar(): void {
    this.sidebarToggle.setAttribute("aria-expanded", "false");
    this.sidebar.classList.remove("open");
  }

  // ---- models ---------------------------------------------------------

  private renderRoutes(): void {
    replaceChildren(
      this.routePicker,
      ...this.models.map((model) =>
        h(
          "option",
          { value: model.alias },
          `${model.alias} — ${model.model}, ${model.pricing.inputPer1k} in / ${model.pricing.outputPer1k} out credits per 1k tokens` +
            (model.primaryOpen ? " (first model unavailable)" : ""),
        ),
      ),
    );
    this.routePicker.value = this.defaultRoute();
    this.showRouteNote();
  }

  /** The recommended route if it is offered, else the deployment's default. */
  private defaultRoute(): string {
    const recommended = this.models.find((model) => model.alias === this.recommended);
    return (recommended ?? this.models.find((model) => model.isDefault) ?? this.models[0])?.alias ?? "";
  }

  /** Says when the picked route's first model is skipped for now. */
  private showRouteNote(): void {
    const picked = this.models.find((model) => model.alias === this.routePicker.value);
    this.routeNote.hidden = picked?.primaryOpen !== true;
    this.routeNote.textContent = this.routeNote.hidden ? "" : PRIMARY_OPEN_NOTE;
  }

  // ---- messages -------------------------------------------------------

  private messageItem(message: Message): HTMLElement {
    return messageItem(message, "You", (reply) => {
      const cost = this.costs.get(reply.id);
      return `${reply.incomplete ? "Incomplete reply. " : ""}${cost === undefined ? "" : `Cost ${credits(cost)} credits.`}`;
    });
  }

  private liveItems(checkpoint: ReplyCheckpoint): Omit<LiveReply, "stream"> {
    const { item, author, body, meta } = streamingReplyItem();
    const elements = [userMessageItem(checkpoint.message, "You"), item];
    this.messageList.append(...elements);
    this.emptyState.hidden = true;
    return { checkpoint, elements, author, body, meta, item, renderScheduled: false };
  }

  // ---- replies --------------------------------------------------------

  private async send(): Promise<void> {
    const message = this.input.value;
    if (message.trim() === "" || this.live !== null) return;
    this.clearNotice();
    let session = this.current;
    if (session === null) {
      session = await this.newChat(titleFrom(message));
      if (session === null) return;
    }
    const route = this.routePicker.value || undefined;
    const stream = this.context.client.streamReply(
      session.sessionId,
      { message, route },
      { signal: this.context.signal },
    );
    this.input.value = "";
    const checkpoint: ReplyCheckpoint = { sessionId: session.sessionId, message, lastEventId: 0, text: "" };
    const sent = await this.follow(stream, checkpoint);
    if (!sent) {
      // Refused before it started: nothing was stored, so the text goes back.
      this.input.value = message;
    }
    this.input.focus();
  }

  /** Shows a reply as it streams; `false` when it was refused before starting. */
  private async follow(stream: ReplyStream, checkpoint: ReplyCheckpoint): Promise<boolean> {
    const live: LiveReply = { stream, ...this.liveItems(checkpoint) };
    this.live = live;
    this.setBusy(true);
    if (checkpoint.text !== "") this.render(live);
    if (checkpoint.model) this.showModel(live, checkpoint.model);
    this.context.announce("The assistant is replying.");
    this.scrollToEnd(true);
    try {
      for await (const event of checkpointed(stream, checkpoint, this.checkpoints)) {
        await this.handle(live, event);
      }
      return true;
    } catch (error) {
      if (this.context.signal.aborted) return false; // signed out
      const started = checkpoint.lastEventId > 0;
      if (!started) {
        for (const element of live.elements) element.remove();
        this.emptyState.hidden = this.messageList.childElementCount > 0;
      } else {
        this.finish(live, "Connection lost. Reload the page to see the rest of this reply.");
      }
      this.say(this.context.fail(error), error instanceof ReplyInProgressError ? this.showRunningButton() : null);
      return started;
    } finally {
      this.live = null;
      this.setBusy(false);
    }
  }

  private async handle(live: LiveReply, event: ReplyEvent): Promise<void> {
    switch (event.type) {
      case "model":
        this.showModel(live, event.data);
        break;
      case "chunk":
        this.scheduleRender(live);
        break;
      case "complete": {
        this.render(live);
        const { credits: cost, messageId, usage } = event.data;
        if (this.current?.messages.some((message) => message.id === messageId)) {
          // Stored before this page loaded it: the stored copy is already shown.
          for (const element of live.elements) element.remove();
          this.finish(live, "");
          break;
        }
        live.item.setAttribute("data-message-id", messageId);
        const parts = [`${usage.outputTokens} tokens.`];
        if (cost !== undefined) {
          this.costs.set(messageId, cost.charged);
          this.context.showBalance(cost.remaining);
          parts.push(`Cost ${credits(cost.charged)} credits; ${credits(cost.remaining)} left.`);
        }
        this.finish(live, parts.join(" "));
        this.context.announce(`Reply complete. ${parts.join(" ")} ${live.checkpoint.text}`);
        void this.refreshSessions();
        void this.refreshObservers();
        break;
      }
      case "error": {
        this.render(live);
        const sentence = describeReplyError(event.data);
        this.finish(live, event.data.code === "CANCELLED" ? "Stopped." : "Ended early.");
        if (event.data.code === "CANCELLED") this.context.announce(sentence);
        else this.say(sentence);
        void this.context.refreshBalance();
        void this.refreshSessions();
        void this.refreshObservers();
        break;
      }
      case "reattached":
        this.context.announce("Reconnected; the reply continues.");
        break;
      case "ended-unseen": {
        // The reply ended while this page was away: show what was stored.
        this.finish(live, "");
        const sessionId = live.checkpoint.sessionId;
        this.live = null;
        await this.open(sessionId, false);
        void this.context.refreshBalance();
        break;
      }
    }
  }

  private showModel(live: LiveReply, data: { model: string; fallbackApplied: boolean; downgraded: boolean }): void {
    live.author.textContent = modelAuthor(data, "downgraded to what you can afford");
  }

  private scheduleRender(live: LiveReply): void {
    if (live.renderScheduled) return;
    live.renderScheduled = true;
    requestAnimationFrame(() => {
      live.renderScheduled = false;
      this.render(live);
    });
  }

  private render(live: LiveReply): void {
    const follow = this.nearEnd();
    replaceChildren(live.body, renderMarkdown(live.checkpoint.text));
    this.scrollToEnd(follow);
  }

  private finish(live: LiveReply, meta: string): void {
    finishReply(live.item, live.meta, meta);
  }

  private async stop(): Promise<void> {
    const live = this.live;
    if (live === null) return;
    this.stopButton.disabled = true;
    try {
      // The stream then ends with CANCELLED, handled like any ending.
      await live.stream.stop();
    } catch (error) {
      this.say(this.context.fail(error));
    }
  }

  private setBusy(busy: boolean): void {
    this.sendButton.disabled = busy;
    this.stopButton.hidden = !busy;
    this.stopButton.disabled = !busy;
  }

  /** A button that shows the reply already running in this chat. */
  private showRunningButton(): HTMLElement | null {
    const session = this.current;
    if (session === null) return null;
    const button = h("button", { type: "button", class: "secondary" }, "Show it");
    button.addEventListener("click", () => {
      this.clearNotice();
      const checkpoint: ReplyCheckpoint = { sessionId: session.sessionId, message: "…", lastEventId: 0, text: "" };
      const stream = this.context.client.resumeReply(session.sessionId, 0, { signal: this.context.signal });
      void this.follow(stream, checkpoint);
    });
    return button;
  }

  // ---- helpers --------------------------------------------------------

  private say(text: string, action: HTMLElement | null = null): void {
    replaceChildren(this.notice, h("p", {}, text), action);
    this.notice.hidden = false;
  }

  private clearNotice(): void {
    replaceChildren(this.notice);
    this.notice.hidden = true;
  }

  private nearEnd(): boolean {
    const list = this.messageList;
    return list.scrollHeight - list.scrollTop - list.clientHeight < 120;
  }

  private scrollToEnd(follow: boolean): void {
    if (!follow) return;
    this.messageList.scrollTop = this.messageList.scrollHeight;
    this.atEnd = true;
  }
}

function titleFrom(message: string): string {
  const line = message.trim().split("\n")[0] ?? "";
  return line.length <= TITLE_FROM_MESSAGE_CHARS ? line : `${line.slice(0, TITLE_FROM_MESSAGE_CHARS - 1)}…`;
}
