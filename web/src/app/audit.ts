/**
 * The console's audit page: every observation of users in the caller's
 * cohorts (admins: all), newest first, 20 a page, optionally of one user
 * (`?user=ID&page=N` in the address, so a view can be reloaded or shared).
 */

import type { AuditPage } from "../client/index.js";
import { h, replaceChildren } from "./dom.js";
import { observationOutcome, when } from "./messages.js";
import type { AppContext } from "./shell.js";
import { dataTable, pager } from "./tables.js";

const PAGE_SIZE = 20;

export async function renderAudit(context: AppContext, main: HTMLElement): Promise<void> {
  main.classList.add("console", "plain");
  document.title = "Audit · Parley";
  const params = new URLSearchParams(location.search);
  let user = params.get("user") ?? "";
  let page = Math.max(1, Number(params.get("page")) || 1);

  const userField = h("input", { id: "audit-user", name: "user", value: user, autocomplete: "off", "aria-describedby": "audit-user-help" });
  const allButton = h("button", { type: "button", class: "secondary" }, "All users");
  const refreshButton = h("button", { type: "button", class: "secondary" }, "Refresh");
  const filter = h(
    "form",
    { class: "filter", role: "search", "aria-label": "Filter the audit" },
    h("label", { for: "audit-user" }, "User id"),
    userField,
    h("button", { type: "submit" }, "Show"),
    allButton,
    refreshButton,
    h("p", { id: "audit-user-help", class: "help" }, "Only the observations of this user's chats."),
  );
  const summary = h("p", { class: "summary", role: "status" });
  const table = dataTable("audit-caption", "Observations", [
    { header: "Observer" },
    { header: "Watched user" },
    { header: "Chat" },
    { header: "Started" },
    { header: "Ended" },
    { header: "How it ended" },
  ]);
  const pages = pager("Pages of the audit", (next) => {
    page = next;
    void load();
  });
  replaceChildren(
    main,
    h("h2", {}, "Observation audit"),
    h("p", { class: "help" }, "Who watched whose replies, newest first. The users are told who watched them."),
    filter,
    summary,
    table.element,
    pages.element,
  );

  const load = async (): Promise<void> => {
    const url = new URL(location.href);
    url.search = "";
    if (user !== "") url.searchParams.set("user", user);
    if (page > 1) url.searchParams.set("page", String(page));
    history.replaceState(null, "", url);
    let answer: AuditPage;
    try {
      answer = await context.client.observationAudit({ userId: user || undefined, page, limit: PAGE_SIZE });
    } catch (error) {
      summary.textContent = context.fail(error);
      return;
    }
    const { observations, pagination } = answer;
    const whose = user === "" ? "" : ` of ${user}`;
    summary.textContent =
      pagination.total === 0
        ? `No observations${whose} yet.`
        : `${pagination.total} observation${pagination.total === 1 ? "" : "s"}${whose}; page ${pagination.page} of ${pagination.pages}.`;
    table.setRows(
      observations.map((observation) => [
        h("span", {}, observation.observerId, h("span", { class: "help" }, ` (${observation.observerRole})`)),
        observation.observedUserId,
        h(
          "a",
          { href: `/console?watch=${observation.sessionId}`, title: observation.sessionId },
          h("span", { class: "sr-only" }, "Watch the chat ending in "),
          h("code", {}, `…${observation.sessionId.slice(-6)}`),
        ),
        h("time", { datetime: observation.startedAt }, when(observation.startedAt)),
        observation.endedAt === undefined
          ? "still watching"
          : h("time", { datetime: observation.endedAt }, when(observation.endedAt)),
        observationOutcome(observation.outcome),
      ]),
    );
    pages.show(pagination.page, Math.max(pagination.pages, 1), pagination.page < pagination.pages);
  };

  filter.addEventListener("submit", (event) => {
    event.preventDefault();
    user = userField.value.trim();
    page = 1;
    void load();
  });
  allButton.addEventListener("click", () => {
    userField.value = "";
    user = "";
    page = 1;
    void load();
  });
  refreshButton.addEventListener("click", () => void load());
  void context.refreshBalance();
  await load();
}
