/**
 * The console's credits page (admins): a user's balance and usage, and a
 * grant of credits to them (`?user=ID` in the address).
 */

import type { Balance, UsagePage } from "../client/index.js";
import { h, replaceChildren } from "./dom.js";
import { credits, when } from "./messages.js";
import type { AppContext } from "./shell.js";
import { dataTable, pager } from "./tables.js";

const USAGE_PAGE_SIZE = 20;
/** The ledger counts credits to the µcredit. */
const CREDIT_STEP = "0.000001";

export async function renderCredits(context: AppContext, main: HTMLElement): Promise<void> {
  main.classList.add("console", "plain");
  document.title = "Credits · Parley";
  let user = new URLSearchParams(location.search).get("user")?.trim() ?? "";
  let usagePage = 1;

  const userField = h("input", { id: "credit-user", name: "user", value: user, required: true, autocomplete: "off" });
  const lookup = h(
    "form",
    { class: "filter", "aria-label": "Find an account" },
    h("label", { for: "credit-user" }, "User id"),
    userField,
    h("button", { type: "submit" }, "Show account"),
  );
  const notice = h("p", { class: "notice", role: "alert", hidden: true });

  const accountHeading = h("h3", { id: "account-heading", tabindex: -1 });
  const figures = {
    balance: h("dd", {}),
    held: h("dd", {}),
    available: h("dd", {}),
  };
  const amount = h("input", {
    id: "grant-credits",
    name: "credits",
    type: "number",
    min: CREDIT_STEP,
    step: CREDIT_STEP,
    inputmode: "decimal",
    required: true,
    "aria-describedby": "grant-help",
  });
  const grantStatus = h("p", { class: "grant-status", role: "status" });
  const grant = h(
    "form",
    { class: "grant", "aria-labelledby": "grant-heading" },
    h("h4", { id: "grant-heading" }, "Grant credits"),
    h("label", { for: "grant-credits" }, "Credits to add"),
    h("div", { class: "grant-row" }, amount, h("button", { type: "submit" }, "Grant")),
    h("p", { id: "grant-help", class: "help" }, "Added to the balance at once; up to six decimals."),
    grantStatus,
  );
  const usageSummary = h("p", { class: "summary" });
  const usageTable = dataTable("usage-caption", "Usage, newest first", [
    { header: "Settled" },
    { header: "Route" },
    { header: "Model" },
    { header: "Tokens in", numeric: true },
    { header: "Tokens out", numeric: true },
    { header: "Charged", numeric: true },
    { header: "Outcome" },
  ]);
  const usagePager = pager("Pages of the usage", (page) => {
    usagePage = page;
    void loadUsage();
  });
  const account = h(
    "section",
    { class: "account-view", "aria-labelledby": "account-heading", hidden: true },
    accountHeading,
    h(
      "dl",
      { class: "figures" },
      h("div", {}, h("dt", {}, "Balance"), figures.balance),
      h("div", {}, h("dt", {}, "On hold"), figures.held),
      h("div", {}, h("dt", {}, "Available"), figures.available),
    ),
    grant,
    h("h4", { id: "usage-heading" }, "Usage"),
    usageSummary,
    usageTable.element,
    usagePager.element,
  );
  replaceChildren(
    main,
    h("h2", {}, "Credits"),
    h(
      "p",
      { class: "help" },
      "Look up a user's account, grant them credits, and see what their replies cost. " +
        "Credits on hold are reserved by replies being written.",
    ),
    lookup,
    notice,
    account,
  );

  const say = (text: string): void => {
    notice.textContent = text;
    notice.hidden = text === "";
  };
  const showBalance = (balance: Balance): void => {
    figures.balance.textContent = credits(balance.balance);
    figures.held.textContent = credits(balance.held);
    figures.available.textContent = credits(balance.available);
    // Granting to oneself changes the header's figure too.
    if (balance.userId === context.identity.sub) context.showBalance(balance.available);
  };

  const loadUsage = async (): Promise<void> => {
    let answer: UsagePage;
    try {
      answer = await context.client.usage({ userId: user, page: usagePage, limit: USAGE_PAGE_SIZE });
    } catch (error) {
      usageSummary.textContent = context.fail(error);
      return;
    }
    const { records } = answer;
    const first = (usagePage - 1) * USAGE_PAGE_SIZE + 1;
    usageSummary.textContent =
      records.length === 0
        ? usagePage === 1
          ? "No replies yet."
          : "No more replies."
        : usagePage === 1 && records.length < USAGE_PAGE_SIZE
          ? `${records.length} repl${records.length === 1 ? "y" : "ies"}, newest first.`
          : `Replies ${first}–${first + records.length - 1}, newest first.`;
    usageTable.setRows(
      records.map((record) => [
        h("time", { datetime: record.settledAt }, when(record.settledAt)),
        record.route,
        record.modelId,
        String(record.inputTokens),
        `${record.outputTokens}${record.estimated ? " (estimated)" : ""}`,
        credits(record.charged),
        record.outcome,
      ]),
    );
    usagePager.show(usagePage, undefined, records.length === USAGE_PAGE_SIZE);
  };

  const show = async (focus: boolean): Promise<void> => {
    say("");
    const url = new URL(location.href);
    url.search = user === "" ? "" : `?user=${encodeURIComponent(user)}`;
    history.replaceState(null, "", url);
    if (user === "") {
      account.hidden = true;
      return;
    }
    let balance: Balance;
    try {
      balance = await context.client.balance(user);
    } catch (error) {
      account.hidden = true;
      say(context.fail(error));
      return;
    }
    accountHeading.textContent = `Account of ${balance.userId}`;
    showBalance(balance);
    grantStatus.textContent = "";
    account.hidden = false;
    if (focus) accountHeading.focus();
    usagePage = 1;
    await loadUsage();
  };

  lookup.addEventListener("submit", (event) => {
    event.preventDefault();
    user = userField.value.trim();
    void show(true);
  });
  grant.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = Number(amount.value);
    if (!(value > 0)) {
      grantStatus.textContent = "Enter a number of credits above zero.";
      return;
    }
    const to = user;
    context.client
      .grantCredits(to, value)
      .then((balance) => {
        if (user !== to) return;
        showBalance(balance);
        amount.value = "";
        grantStatus.textContent = `Granted ${credits(value)} credits to ${to}; ${credits(balance.available)} available now.`;
      })
      .catch((error: unknown) => (grantStatus.textContent = context.fail(error)));
  });
  void context.refreshBalance();
  await show(false);
}
