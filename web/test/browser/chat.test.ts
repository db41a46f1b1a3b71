/**
 * The chat page in headless Chromium against the real parley-service
 * binary on the simulated model (which echoes the prompt, paced so that a
 * reply visibly grows). Screenshots land in docs/screenshots/.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { Page } from "playwright-core";

import {
  PACE,
  assertAccessible,
  assertGrewOverTime,
  browserForTests,
  captureBothWidths,
  devSignIn as signIn,
  finishedReply,
  lastReply,
  recordGrowth,
  routesFile,
  send,
  settled,
  startFailingModelServer,
  startService,
  tabTo,
  words,
  type Service,
} from "./harness.js";

const { newPage } = browserForTests();

async function devSignIn(page: Page, service: Service, sub: string): Promise<void> {
  await signIn(page, service, sub);
  await page.getByRole("textbox", { name: "Message" }).waitFor();
}

async function tokenSignIn(page: Page, service: Service, token: string): Promise<void> {
  await page.goto(`${service.base}/`);
  await page.getByLabel("Bearer token (JWT)").fill(token);
  await page.getByRole("button", { name: "Sign in", exact: true }).click();
  await page.getByRole("textbox", { name: "Message" }).waitFor();
}

async function api<T>(service: Service, page: Page, path: string): Promise<T> {
  const token = await page.evaluate(() => sessionStorage.getItem("parley.token"));
  const response = await fetch(`${service.base}${path}`, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(response.status, 200, `${path}: ${await response.clone().text()}`);
  return (await response.json()) as T;
}

interface StoredSession {
  sessionId: string;
  title: string;
  messages: Array<{ role: string; content: string; incomplete?: boolean }>;
}

async function storedSession(service: Service, page: Page): Promise<StoredSession> {
  const id = new URL(page.url()).searchParams.get("session");
  assert.ok(id, "the page names its chat in the URL");
  return api<StoredSession>(service, page, `/api/chat/sessions/${id}`);
}

describe("chat page on the simulated model", () => {
  let service: Service;

  before(async () => {
    // One reply at a time per user, so that a second tab is refused (429).
    service = await startService({ ...PACE, PARLEY_RATE_LIMIT_CONCURRENT_STREAMS: "1" });
  });

  after(async () => {
    await service?.stop();
  });

  test("sign in, create and rename a chat, watch a reply stream in, see its cost and the new balance", async () => {
    const { page, problems } = await newPage();
    await page.goto(`${service.base}/`);
    await page.getByRole("button", { name: "Dev sign-in" }).waitFor();
    await captureBothWidths(page, "signin", () => settled(page), { fullPage: true });

    await devSignIn(page, service, "ann");
    await assertAccessible(page, "the chat page with no chats");
    const before = await api<{ available: number }>(service, page, "/api/credits/balance");
    await page.getByRole("button", { name: "New chat" }).click();
    await page.getByRole("heading", { name: "New Chat", level: 2 }).waitFor();
    await page.getByRole("button", { name: "Rename" }).click();
    await page.getByLabel("New title").fill("Streaming, watched");
    await page.getByRole("button", { name: "Save" }).click();
    await page.getByRole("heading", { name: "Streaming, watched", level: 2 }).waitFor();
    await page.getByRole("link", { name: "Streaming, watched" }).waitFor();

    const prompt = words(40);
    await recordGrowth(page, ".messages");
    await send(page, prompt);
    const text = await finishedReply(page);
    assert.equal(text, prompt);

    const { lengths } = await assertGrewOverTime(page);
    assert.ok((lengths[0] ?? 0) < prompt.length / 4, "the first text shown is a small part of the reply");

    const meta = (await lastReply(page).locator(".meta").textContent()) ?? "";
    const match = /Cost ([\d.]+) credits; ([\d.]+) left/.exec(meta);
    assert.ok(match, meta);
    const [charged, left] = [Number(match[1]), Number(match[2])];
    assert.ok(charged > 0);
    const balance = await api<{ available: number }>(service, page, "/api/credits/balance");
    assert.equal(left, balance.available);
    assert.ok(Math.abs(before.available - charged - balance.available) < 1e-9, "charged exactly once");
    assert.equal(await page.locator(".balance-amount").textContent(), String(balance.available));

    const stored = await storedSession(service, page);
    assert.equal(stored.title, "Streaming, watched");
    assert.deepEqual(
      stored.messages.map((message) => [message.role, message.content]),
      [
        ["user", prompt],
        ["assistant", prompt],
      ],
    );

    await page.getByRole("button", { name: "Delete" }).click();
    await page.getByRole("button", { name: "Delete chat" }).click();
    await page.getByRole("heading", { name: "No chat open", level: 2 }).waitFor();
    assert.equal(await page.locator(".session-link").count(), 0);
    const remaining = await api<{ sessions: unknown[] }>(service, page, "/api/chat/sessions");
    assert.deepEqual(remaining.sessions, [], "deleted in the service too");

    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByRole("heading", { name: "Sign in with a token" }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0, "nothing of the session is kept");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("the keyboard alone signs in, moves through the page in reading order, and sends", async () => {
    const { page, problems } = await newPage();
    await page.goto(`${service.base}/`);
    await page.getByRole("button", { name: "Dev sign-in" }).waitFor();
    assert.deepEqual(await tabTo(page, "User id"), ["Bearer token (JWT)", "Sign in", "User id"]);
    await page.keyboard.press("Control+A");
    await page.keyboard.type("kim");
    assert.deepEqual(await tabTo(page, "Dev sign-in"), ["Role", "Cohorts", "Dev sign-in"]);
    await page.keyboard.press("Enter");
    await page.getByRole("textbox", { name: "Message" }).waitFor();
    // The message list is named by the conversation's heading, which is set once the chats have loaded.
    await page.getByRole("heading", { name: "No chat open" }).waitFor();

    // Reading order: header, chats, conversation, composer.
    await page.locator("body").focus();
    const order = await tabTo(page, "Send");
    // "No chat open" is the message list, scrollable by keyboard.
    assert.deepEqual(order, ["Skip to content", "Chat", "Sign out", "New chat", "No chat open", "Model", "Message", "Send"]);
    // The skip link leads to the content.
    await page.getByRole("link", { name: "Skip to content" }).focus();
    await page.keyboard.press("Enter");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "main");

    await page.getByRole("textbox", { name: "Message" }).focus();
    await page.keyboard.type("typed and sent with Enter");
    await page.keyboard.press("Enter");
    assert.equal(await finishedReply(page), "typed and sent with Enter");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a reload mid-reply continues the same reply with no gap and no duplicate", async () => {
    const { page, problems } = await newPage();
    const reattachments: string[] = [];
    page.on("request", (request) => {
      const lastEventId = request.headers()["last-event-id"];
      if (request.method() === "GET" && lastEventId !== undefined) reattachments.push(lastEventId);
    });
    await devSignIn(page, service, "bob");
    await page.getByRole("button", { name: "New chat" }).click();
    const prompt = words(70, "r");
    await send(page, prompt);
    const streaming = page.locator(".message.assistant.streaming .body");
    await page.waitForFunction(() => {
      const body = document.querySelector(".message.assistant.streaming .body");
      return (body?.textContent ?? "").split(" ").length >= 15;
    });
    await captureBothWidths(page, "chat-streaming", () => settled(page));
    const beforeReload = (await streaming.textContent()) ?? "";
    await page.reload();

    // Restored at once from the checkpoint, then continued by the service.
    await page.locator(".message.assistant.streaming").waitFor();
    const restored = (await streaming.textContent()) ?? "";
    assert.ok(restored.startsWith(beforeReload), "nothing shown before the reload is lost");
    const text = await finishedReply(page);
    assert.equal(text, prompt, "the reply reads exactly as the model wrote it");
    assert.equal(reattachments.length, 1, `re-attached once: ${reattachments.join(", ")}`);
    assert.ok(Number(reattachments[0]) > 1, "after the events already shown");

    const stored = await storedSession(service, page);
    assert.deepEqual(
      stored.messages.map((message) => [message.role, message.content]),
      [
        ["user", prompt],
        ["assistant", text],
      ],
    );
    assert.equal(await page.locator(".messages .message").count(), 2, "no duplicate message on the page");
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a reply with HTML, script and a javascript: link renders as text and runs nothing", async () => {
    const { page, problems } = await newPage();
    await devSignIn(page, service, "cyd");
    const attack =
      '**Safe** `code` <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> ' +
      "[click](javascript:window.pwned=3) <a href=javascript:window.pwned=4>link</a> " +
      "[docs](https://example.com/docs)";
    await send(page, attack);
    await finishedReply(page);
    const reply = lastReply(page).locator(".body");
    const text = (await reply.textContent()) ?? "";
    for (const literal of [
      '<img src=x onerror="window.pwned=1">',
      "<script>window.pwned=2</script>",
      "[click](javascript:window.pwned=3)",
      "<a href=javascript:window.pwned=4>link</a>",
    ]) {
      assert.ok(text.includes(literal), `${literal} is shown as text in: ${text}`);
    }
    const messages = page.locator(".messages");
    assert.equal(await messages.locator("img, script, iframe, object, embed").count(), 0);
    const hrefs = await messages.locator("a").evaluateAll((links) => links.map((link) => link.getAttribute("href")));
    assert.deepEqual(hrefs, ["https://example.com/docs"]);
    assert.equal(await reply.locator("a").getAttribute("rel"), "noopener noreferrer nofollow");
    assert.equal(await reply.locator("strong").textContent(), "Safe");
    assert.equal(await reply.locator("code").textContent(), "code");
    // Where the link would be: clicking the text does nothing.
    await reply.getByText("[click](javascript:window.pwned=3)", { exact: false }).click();
    assert.equal(await page.evaluate(() => (window as unknown as { pwned?: number }).pwned), undefined);
    assert.deepEqual(problems, [], "no script ran and the CSP refused nothing");
    await captureBothWidths(page, "chat", () => settled(page));
    await page.close();
  });

  test("stop ends the reply at once and keeps what was written", async () => {
    const { page, problems } = await newPage();
    await devSignIn(page, service, "dee");
    const prompt = words(80, "s");
    await send(page, prompt);
    await page.waitForFunction(() => {
      const body = document.querySelector(".message.assistant.streaming .body");
      return (body?.textContent ?? "").split(" ").length >= 5;
    });
    await page.getByRole("button", { name: "Stop" }).click();
    const text = await finishedReply(page, /Stopped/);
    assert.ok(text.length > 0 && text.length < prompt.length, text);
    assert.ok(prompt.startsWith(text));
    await page.getByRole("button", { name: "Send" }).and(page.locator(":enabled")).waitFor();
    const stored = await storedSession(service, page);
    const reply = stored.messages.at(-1);
    assert.equal(reply?.content, text, "the stored reply is what was shown");
    assert.equal(reply?.incomplete, true);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test("a second tab is told about the running reply (409) and the stream limit (429), and can follow the reply", async () => {
    const first = await newPage();
    await devSignIn(first.page, service, "eve");
    await first.page.getByRole("button", { name: "New chat" }).click();
    await first.page.getByRole("heading", { name: "New Chat", level: 2 }).waitFor();
    const prompt = words(60, "t");
    await send(first.page, prompt);
    await first.page.locator(".message.assistant.streaming").waitFor();

    // The second tab signs in with a pasted token (minted by `parley-service token`).
    const second = await newPage();
    await tokenSignIn(second.page, service, service.token("eve"));
    await second.page.getByRole("button", { name: "New chat" }).click();
    await second.page.getByRole("heading", { name: "New Chat", level: 2 }).waitFor();
    await send(second.page, "hello");
    const notice = second.page.getByRole("alert");
    await notice.getByText(/too fast \(rate limited\)\. Try again in 1 second/).waitFor();
    assert.equal(await second.page.getByRole("textbox", { name: "Message" }).inputValue(), "hello");

    // The chat of the first tab is the second one in the list.
    await second.page.locator(".session-link").nth(1).click();
    await send(second.page, "me too");
    await notice.getByText(/already has a reply in progress/).waitFor();
    await notice.getByRole("button", { name: "Show it" }).click();
    const followed = await finishedReply(second.page);
    const original = await finishedReply(first.page);
    assert.equal(followed, prompt);
    assert.equal(original, prompt);
    assert.deepEqual(first.problems, []);
    assert.deepEqual(second.problems, []);
    await first.page.close();
    await second.page.close();
  });
});

describe("chat page when credits run out", () => {
  let service: Service;

  before(async () => {
    service = await startService({ ...PACE, PARLEY_INITIAL_CREDITS: "0.001" });
  });

  after(async () => {
    await service?.stop();
  });

  test("out of credits: the page says so and keeps the message", async () => {
    const { page, problems } = await newPage();
    await devSignIn(page, service, "fay");
    await send(page, "Please answer this");
    const notice = page.getByRole("alert");
    await notice.getByText(/You are out of credits\. This reply could cost up to [\d.]+ credits and you have 0\.001 available/).waitFor();
    assert.equal(await page.getByRole("textbox", { name: "Message" }).inputValue(), "Please answer this");
    assert.equal(await page.locator(".messages .message").count(), 0, "nothing was sent");
    await captureBothWidths(page, "chat-out-of-credits", () => settled(page));
    assert.deepEqual(problems, []);
    await page.close();
  });
});

describe("chat page with a throttled first target", () => {
  let service: Service;
  let models: Awaited<ReturnType<typeof startFailingModelServer>>;

  before(async () => {
    models = await startFailingModelServer();
    const routes = routesFile(`
routes:
  - alias: default
    fallbackOn: [throttled, unavailable, timeout]
    targets:
      - provider: openai
        model: busy-model
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 256
        circuitBreaker: {failureThreshold: 1, cooldownSeconds: 600}
      - provider: simulated
        model: simulated-fallback
        pricing: {inputPer1k: 1, outputPer1k: 2}
        maxOutputTokens: 256
  - alias: down
    targets:
      - provider: openai
        model: down-model
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 256
`);
    service = await startService({
      ...PACE,
      PARLEY_ROUTES_FILE: routes,
      PARLEY_OPENAI_BASE_URL: models.baseUrl,
    });
  });

  after(async () => {
    await service?.stop();
    await models?.close();
  });

  test("the reply still arrives from the fallback, and a model that is down is named", async () => {
    const { page, problems } = await newPage();
    await devSignIn(page, service, "gus");
    const picker = page.getByLabel("Model");
    assert.deepEqual(await picker.locator("option").allTextContents(), [
      "default — busy-model, 1 in / 1 out credits per 1k tokens",
      "down — down-model, 1 in / 1 out credits per 1k tokens",
    ]);
    const prompt = words(12, "f");
    await send(page, prompt);
    assert.equal(await finishedReply(page), prompt);
    assert.equal(await lastReply(page).locator(".author").textContent(), "Assistant · simulated-fallback (fallback)");
    assert.ok((models.calls.get("busy-model") ?? 0) >= 1, "the throttled target was tried first");

    // That throttle opened busy-model's breaker: after a reload the picker
    // says so, and the next reply goes straight to the fallback.
    const busyCalls = models.calls.get("busy-model");
    await page.reload();
    await picker.locator("option").first().filter({ hasText: "(first model unavailable)" }).waitFor({ state: "attached" });
    // The routes are listed before the chat is opened, and until then the
    // picker shows the recommended route; the note follows the chat's route.
    await lastReply(page).locator(".body", { hasText: prompt }).waitFor();
    assert.equal(
      await page.locator("#route-note").textContent(),
      "Its first model is unavailable for now; the next one answers.",
    );
    await captureBothWidths(page, "chat-primary-open", () => settled(page));
    await send(page, words(4, "g"));
    assert.equal(await finishedReply(page), words(4, "g"));
    assert.equal(models.calls.get("busy-model"), busyCalls, "the open target was skipped");

    await picker.selectOption("down");
    await send(page, "are you there");
    await page.getByRole("alert").getByText(/The model is down right now/).waitFor();
    await lastReply(page).locator(".meta", { hasText: "Ended early." }).waitFor();
    assert.ok((models.calls.get("down-model") ?? 0) >= 1);
    assert.deepEqual(problems, []);
    await page.close();
  });
});
