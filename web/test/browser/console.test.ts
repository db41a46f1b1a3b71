/**
 * The supervisor console in headless Chromium against the real
 * parley-service binary: the live list of replies, watching one stream,
 * the audit, what a user is refused, an admin's grant, and what the
 * student is told about being watched. Screenshots land in docs/screenshots/.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { Page } from "playwright-core";

import {
  PACE,
  assertGrewOverTime,
  browserForTests,
  captureBothWidths,
  devSignIn,
  finishedReply,
  recordGrowth,
  send,
  settled,
  startCuttableProxy,
  startService,
  tabTo,
  words,
  type Service,
} from "./harness.js";

const { newPage } = browserForTests();

/** A student signed in on the chat page with a new chat open. */
async function student(service: Service, sub: string, cohorts: string[]): Promise<{ page: Page; problems: string[] }> {
  const opened = await newPage();
  await devSignIn(opened.page, service, sub, { cohorts });
  await opened.page.getByRole("button", { name: "New chat" }).click();
  await opened.page.getByRole("heading", { name: "New Chat", level: 2 }).waitFor();
  return opened;
}

async function bearer(page: Page): Promise<string> {
  const token = await page.evaluate(() => sessionStorage.getItem("parley.token"));
  assert.ok(token, "signed in");
  return token;
}

async function apiStatus(service: Service, page: Page, path: string): Promise<[number, { code?: string }]> {
  const response = await fetch(`${service.base}${path}`, { headers: { Authorization: `Bearer ${await bearer(page)}` } });
  return [response.status, (await response.json()) as { code?: string }];
}

/** The watch view's state line once it matches `text`. */
async function watchState(page: Page, text: RegExp): Promise<void> {
  await page.locator(".watch-state", { hasText: text }).waitFor({ timeout: 30_000 });
}

/** Records every text the watch view's state line shows. */
async function recordStates(page: Page): Promise<void> {
  await page.evaluate(() => {
    const states: string[] = [];
    (window as unknown as { states: string[] }).states = states;
    const line = document.querySelector(".watch-state") as Element;
    new MutationObserver(() => states.push(line.textContent ?? "")).observe(line, {
      subtree: true,
      childList: true,
      characterData: true,
    });
  });
}

const recordedStates = (page: Page): Promise<string[]> =>
  page.evaluate(() => (window as unknown as { states: string[] }).states);

describe("supervisor console", () => {
  let service: Service;

  before(async () => {
    // Pings every second: an observer that left is noticed (and audited) at once.
    service = await startService({ ...PACE, PARLEY_SSE_PING_SECONDS: "1" });
  });

  after(async () => {
    await service?.stop();
  });

  test("a supervisor sees a student's reply appear, watches it stream and end; the audit records it; the student sees who watched", async () => {
    const stu = await student(service, "stu", ["class-a"]);
    const oli = await student(service, "oli", ["class-b"]);
    const sam = await newPage();
    const page = sam.page;
    await devSignIn(page, service, "sam", { role: "supervisor", cohorts: ["class-a"], path: "/console" });
    await page.getByRole("heading", { name: "Replies in flight (0)" }).waitFor();
    await page.getByText("No replies in flight right now.").waitFor();
    await page.getByText("Live: replies appear here as they start.").waitFor();

    const prompt = words(120, "v");
    await send(stu.page, prompt);
    await send(oli.page, words(40, "o"));
    await oli.page.locator(".message.assistant.streaming").waitFor();
    // The reply appears by itself: the page does not poll.
    const card = page.locator(".live .reply-card", { hasText: "stu" });
    await card.waitFor();
    await page.getByRole("heading", { name: "Replies in flight (1)" }).waitFor();
    assert.equal(await card.getByText("class-a").count(), 1);
    assert.equal(await page.locator(".live").getByText("oli").count(), 0, "a reply outside the cohorts is not listed");

    // By keyboard: the header, then the reply's Watch button; Enter opens it.
    await recordGrowth(page, ".watch .messages");
    await recordStates(page);
    await page.locator("body").focus();
    assert.deepEqual(await tabTo(page, "Watch stu's chat"), [
      "Skip to content",
      "Chat",
      "Live replies",
      "Audit",
      "Sign out",
      "Watch stu's chat",
    ]);
    await page.keyboard.press("Enter");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "watch-title", "the focus moves to what is watched");
    await page.getByRole("heading", { name: /^Watching stu/, level: 2 }).waitFor();
    assert.equal(new URL(page.url()).searchParams.has("watch"), true, "the address names the watched chat");
    await watchState(page, /stu is getting a reply/);
    await page.waitForFunction(() => {
      const body = document.querySelector(".watch .message.assistant.streaming .body");
      return (body?.textContent ?? "").split(" ").length >= 20;
    });
    // While the reply is written, the question it answers is shown above it.
    assert.deepEqual(
      await page.locator(".watch .messages .message.user .body").allTextContents(),
      [prompt],
      "the question before the answer",
    );
    await captureBothWidths(page, "console-watching", () => settled(page));

    await watchState(page, /The reply completed\. Waiting for the next reply/);
    await assertGrewOverTime(page);
    const watched = page.locator(".watch .messages .message");
    assert.deepEqual(await watched.locator(".body").allTextContents(), [prompt, prompt], "the question and the reply, once each");
    assert.match((await watched.last().locator(".meta").textContent()) ?? "", /^Completed: \d+ tokens, cost [\d.]+ credits\.$/);
    assert.equal(await stu.page.locator(".messages .message.assistant").count(), 1);
    assert.equal(await finishedReply(stu.page), prompt);
    const states = await recordedStates(page);
    assert.ok(states.includes("The reply is complete."), states.join(" | "));

    // The list: the reply moved to the recently ended ones, with how it ended.
    await page.getByRole("heading", { name: "Replies in flight (0)" }).waitFor();
    const ended = page.locator(".reply-list.ended .reply-card", { hasText: "stu" });
    await ended.getByText(/· completed, ended /).waitFor();
    assert.equal(await ended.getByRole("button", { name: "Watching stu's chat" }).count(), 1);
    await finishedReply(oli.page);
    assert.equal(await page.locator(".live").getByText("oli").count(), 0, "nor once it ended");

    // The student sees who watched, without reloading: the page asks after each reply.
    const observed = stu.page.locator("details.observed-by");
    await observed.locator("summary", { hasText: "Observed by sam (supervisor)" }).waitFor();
    await observed.locator("summary").click();
    await observed.getByText(/sam \(supervisor\): .* – watching now/).waitFor();

    await page.getByRole("button", { name: "Stop watching" }).click();
    await page.getByRole("heading", { name: "Not watching", level: 2 }).waitFor();
    assert.equal(new URL(page.url()).searchParams.has("watch"), false);

    // The audit: the observation, ended when the supervisor left.
    await page.getByRole("link", { name: "Audit" }).click();
    await page.getByRole("heading", { name: "Observation audit" }).waitFor();
    const row = page.locator("tbody tr", { hasText: "stu" });
    await row.waitFor();
    for (let attempt = 0; !(await row.textContent())?.includes("left"); attempt++) {
      // The end is written when the service notices the connection closed (within a ping).
      assert.ok(attempt < 40, `the observation never ended: ${await row.textContent()}`);
      await page.getByRole("button", { name: "Refresh" }).click();
      await row.getByText("left").waitFor({ timeout: 500 }).catch(() => undefined);
    }
    const cells = await row.locator("td").allTextContents();
    assert.equal(cells[0], "sam (supervisor)");
    assert.equal(cells[1], "stu");
    assert.equal(cells[5], "left");
    await page.getByText("1 observation; page 1 of 1.").waitFor();
    await captureBothWidths(page, "console-audit", () => settled(page));

    await page.getByLabel("User id").fill("nobody");
    await page.getByRole("button", { name: "Show" }).click();
    await page.getByText("No observations of nobody yet.").waitFor();
    assert.equal(new URL(page.url()).searchParams.get("user"), "nobody");
    await page.getByRole("button", { name: "All users" }).click();
    await page.getByText("1 observation; page 1 of 1.").waitFor();

    // After a reload, the student sees the observation ended.
    await stu.page.reload();
    await observed.locator("summary").click();
    await observed.getByText(/sam \(supervisor\): .* – \S/).waitFor();
    assert.equal(await observed.getByText("watching now").count(), 0);
    await captureBothWidths(stu.page, "chat-observed", () => settled(stu.page));

    for (const { page: opened, problems } of [stu, oli, sam]) {
      assert.deepEqual(problems, []);
      await opened.close();
    }
  });

  test("a dropped connection: the console reconnects, and the watched reply starts over and shows once", async () => {
    const proxy = await startCuttableProxy(service.base);
    try {
      const dee = await student(service, "dee", ["class-d"]);
      const sue = await newPage();
      const page = sue.page;
      // The supervisor reaches the service through a proxy that can cut its connections.
      await devSignIn(page, { ...service, base: proxy.base }, "sue", { role: "supervisor", cohorts: ["class-d"], path: "/console" });
      await page.getByText("Live: replies appear here as they start.").waitFor();

      const prompt = words(80, "d");
      await send(dee.page, prompt);
      await page.locator(".live .reply-card", { hasText: "dee" }).getByRole("button").click();
      await recordStates(page);
      await page.waitForFunction(() => {
        const body = document.querySelector(".watch .message.assistant.streaming .body");
        return (body?.textContent ?? "").split(" ").length >= 10;
      });
      assert.ok(proxy.drop() >= 2, "the live list and the watch were connected");

      await watchState(page, /The reply completed\. Waiting for the next reply/);
      const states = await recordedStates(page);
      assert.ok(states.includes("The connection was lost; reconnecting…"), states.join(" | "));
      assert.ok(states.includes("Reconnected; waiting for a reply in this chat."), states.join(" | "));
      assert.deepEqual(
        await page.locator(".watch .messages .message .body").allTextContents(),
        [prompt, prompt],
        "the replayed reply replaced what was shown: nothing twice",
      );
      assert.equal(await finishedReply(dee.page), prompt, "the student's reply never noticed");
      // The live list came back too, with the whole list.
      await page.locator(".live .connection", { hasText: /^Live|^Reconnected/ }).waitFor();
      await page.getByRole("heading", { name: "Replies in flight (0)" }).waitFor();
      assert.deepEqual(sue.problems, []);
      assert.deepEqual(dee.problems, []);
      await page.close();
      await dee.page.close();
    } finally {
      await proxy.close();
    }
  });

  test("a user opening the console is refused, and the API refuses them too", async () => {
    const { page, problems } = await newPage();
    await devSignIn(page, service, "uma", { cohorts: ["class-a"], path: "/console" });
    await page.getByRole("heading", { name: "Not available to you" }).waitFor();
    await page
      .getByRole("alert")
      .getByText("“Live replies” is part of the supervisor console, for supervisors and admins only. You are signed in as uma, a user.")
      .waitFor();
    const links = await page.getByRole("navigation", { name: "Pages" }).getByRole("link").allTextContents();
    assert.deepEqual(links, ["Chat"], "a user's header offers no console page");
    await captureBothWidths(page, "console-refused", () => settled(page));
    for (const path of ["/api/observe/live", "/api/observe/audit"]) {
      const [status, body] = await apiStatus(service, page, path);
      assert.equal(status, 403, path);
      assert.equal(body.code, "FORBIDDEN", path);
    }
    await page.goto(`${service.base}/console/credits`);
    await page.getByText("“Credits” is part of the supervisor console, for admins only.", { exact: false }).waitFor();

    // A supervisor has the console, but not the admins' credits page.
    await page.getByRole("button", { name: "Sign out" }).click();
    await devSignIn(page, service, "sid", { role: "supervisor", cohorts: ["class-a"], path: "/console/credits" });
    await page.getByText("for admins only. You are signed in as sid, a supervisor.", { exact: false }).waitFor();
    const [status] = await apiStatus(service, page, "/api/credits/balance?userId=uma");
    assert.equal(status, 403, "the service refuses a supervisor another user's balance");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("an admin sees a user's balance and usage and grants credits; the user's balance updates", async () => {
    const gia = await student(service, "gia", []);
    await send(gia.page, "one question");
    await finishedReply(gia.page);
    const before = Number(await gia.page.locator(".balance-amount").textContent());
    assert.ok(before > 0 && before < 100, `gia paid for her reply: ${before}`);

    const { page, problems } = await newPage();
    await devSignIn(page, service, "ada", { role: "admin", path: "/console/credits" });
    await page.getByRole("heading", { name: "Credits", level: 2 }).waitFor();
    await page.getByLabel("User id").fill("gia");
    await page.getByRole("button", { name: "Show account" }).click();
    await page.getByRole("heading", { name: "Account of gia" }).waitFor();
    const available = page.locator(".figures div", { hasText: "Available" }).locator("dd");
    assert.equal(Number(await available.textContent()), before);
    const usage = page.locator(".account-view tbody tr");
    await usage.first().waitFor();
    const cells = await usage.first().locator("td").allTextContents();
    assert.deepEqual(cells.slice(1, 3), ["default", "parley-simulated"]);
    assert.equal(cells[6], "completed");
    assert.equal(Number(cells[5]), Math.round((100 - before) * 1e6) / 1e6, "the charge is what left the balance");

    await page.getByLabel("Credits to add").fill("25");
    await page.getByRole("button", { name: "Grant" }).click();
    const after = Math.round((before + 25) * 1e6) / 1e6;
    await page.getByRole("status").getByText(`Granted 25 credits to gia; ${after} available now.`).waitFor();
    assert.equal(Number(await available.textContent()), after);
    assert.equal(new URL(page.url()).searchParams.get("user"), "gia");
    await captureBothWidths(page, "console-credits", () => settled(page), { fullPage: true });

    // The user's page shows the new balance.
    await gia.page.reload();
    await gia.page.locator(".balance-amount", { hasText: String(after) }).waitFor();

    // Admins see every user's replies in the live list, and the audit of all.
    await page.getByRole("link", { name: "Live replies" }).click();
    await page.getByText("Every user's replies, as they are written.").waitFor();
    await send(gia.page, words(30, "g"));
    await page.locator(".live .reply-card", { hasText: "gia" }).waitFor();
    await finishedReply(gia.page);
    assert.deepEqual(problems, []);
    assert.deepEqual(gia.problems, []);
    await page.close();
    await gia.page.close();
  });
});
