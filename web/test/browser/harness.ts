/**
 * What the browser tests run against: the real `parley-service` binary
 * (PARLEY_SERVICE_BIN, built by `cargo build`), Debian's Chromium driven by
 * playwright-core (nothing downloaded), axe-core for accessibility scans,
 * and a throttling OpenAI-compatible stand-in for fallback.
 */

import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { connect, createServer as createTcpServer, type AddressInfo, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createRequire } from "node:module";
import { after, before } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium, type BrowserContext, type Page } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (this file runs from web/.test-build/browser/). */
export const REPO = resolve(here, "..", "..", "..");

export const DESKTOP = { width: 1280, height: 800 } as const;
export const PHONE = { width: 390, height: 844 } as const;

function required(path: string | undefined, what: string, how: string): string {
  if (path === undefined || path === "" || !existsSync(path)) {
    throw new Error(`${what} not found at ${JSON.stringify(path)}: ${how}`);
  }
  return path;
}

export interface Service {
  base: string;
  dataDir: string;
  /** The service's log so far (JSON lines on stderr). */
  log(): string;
  /** A token for `sub`, minted by `parley-service token` on the same data dir. */
  token(sub: string, role?: string, cohorts?: string[]): string;
  stop(): Promise<void>;
}

function serviceBinary(): string {
  return required(
    process.env.PARLEY_SERVICE_BIN,
    "the parley-service binary (PARLEY_SERVICE_BIN)",
    "build it with `cargo build -p parley-service` (scripts/test.sh's rust suite does) and set PARLEY_SERVICE_BIN",
  );
}

/** Starts the service in local mode on a free loopback port; resolves once it serves. */
export async function startService(env: Record<string, string> = {}): Promise<Service> {
  const binary = serviceBinary();
  const dataDir = mkdtempSync(join(tmpdir(), "parley-web-test-"));
  const serviceEnv: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    PARLEY_LISTEN: "127.0.0.1:0",
    PARLEY_DATA_DIR: dataDir,
    RUST_LOG: "info",
    ...env,
  };
  const child: ChildProcess = spawn(binary, [], { env: serviceEnv, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  child.stdout?.setEncoding("utf8").on("data", (text: string) => (log += text));
  const address = await new Promise<string>((resolveAddress, reject) => {
    let pending = "";
    child.stderr?.setEncoding("utf8").on("data", (text: string) => {
      log += text;
      pending += text;
      let newline;
      while ((newline = pending.indexOf("\n")) !== -1) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        if (line.includes('"serving"')) {
          const parsed = JSON.parse(line) as { fields: { address: string } };
          resolveAddress(parsed.fields.address);
        }
      }
    });
    child.once("exit", (code) => reject(new Error(`parley-service exited (${code}) before serving:\n${log}`)));
  });
  const exited = new Promise<void>((resolveExit) => child.once("exit", () => resolveExit()));
  return {
    base: `http://${address}`,
    dataDir,
    log: () => log,
    token(sub, role = "user", cohorts = []) {
      const args = ["token", "--sub", sub, "--role", role, ...cohorts.flatMap((c) => ["--cohort", c])];
      const minted = spawnSync(binary, args, { env: serviceEnv, encoding: "utf8" });
      if (minted.status !== 0) throw new Error(`parley-service token failed: ${minted.stderr}`);
      return minted.stdout.trim();
    },
    async stop() {
      child.kill("SIGTERM");
      await exited;
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** Chromium from Debian with a fresh profile, started the way this machine needs. */
export async function launchBrowser(): Promise<{ context: BrowserContext; close(): Promise<void> }> {
  const executablePath = required(
    process.env.PARLEY_CHROMIUM ?? "/usr/bin/chromium",
    "Chromium",
    "install Debian's package: apt-get install -y chromium (scripts/test-web.sh does)",
  );
  const profile = mkdtempSync(join(tmpdir(), "parley-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: DESKTOP,
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/**
 * One Chromium for the tests of a file: started before them, closed after.
 * `newPage` opens a tab whose problems are watched.
 */
export function browserForTests(): { newPage(): Promise<{ page: Page; problems: string[] }> } {
  let browser: { context: BrowserContext; close(): Promise<void> } | undefined;
  before(async () => {
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
  });
  return {
    async newPage() {
      if (browser === undefined) throw new Error("the browser is started before the tests");
      const page = await browser.context.newPage();
      return { page, problems: watchForProblems(page) };
    },
  };
}

/** Problems a page reports: uncaught errors and console errors (CSP refusals included). */
export function watchForProblems(page: Page): string[] {
  const problems: string[] = [];
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("console", (message) => {
    // The refusals the tests provoke (402, 409, 429) are logged by Chromium too.
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      problems.push(`console: ${message.text()}`);
    }
  });
  return problems;
}

const require = createRequire(import.meta.url);
const AXE_SOURCE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

export interface AxeViolation {
  id: string;
  impact: string | null;
  help: string;
  nodes: Array<{ target: string[]; failureSummary?: string }>;
}

/** axe-core's WCAG 2.1 A/AA and best-practice rules on the page as it is. */
export async function axeViolations(page: Page): Promise<AxeViolation[]> {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern.
  await page.evaluate(AXE_SOURCE);
  return page.evaluate(async () => {
    const axe = (window as unknown as { axe: { run(context: Document, options: object): Promise<{ violations: AxeViolation[] }> } }).axe;
    const result = await axe.run(document, {
      runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"] },
      resultTypes: ["violations"],
    });
    return result.violations.map((violation) => ({
      id: violation.id,
      impact: violation.impact,
      help: violation.help,
      nodes: violation.nodes.map((node) => ({ target: node.target, failureSummary: node.failureSummary })),
    }));
  });
}

/** Fails on serious or critical violations; returns the rest for the log. */
export async function assertAccessible(page: Page, what: string): Promise<AxeViolation[]> {
  const violations = await axeViolations(page);
  const blocking = violations.filter((violation) => violation.impact === "serious" || violation.impact === "critical");
  if (blocking.length > 0) {
    throw new Error(`axe-core found serious problems on ${what}:\n${JSON.stringify(blocking, null, 2)}`);
  }
  for (const violation of violations) {
    console.log(`axe (${violation.impact}) on ${what}: ${violation.id}: ${violation.help} (${violation.nodes.length} nodes)`);
  }
  return violations;
}

/** Where the screenshots go (committed under docs/screenshots; every run rewrites them). */
export function screenshotPath(name: string): string {
  const dir = process.env.PARLEY_SCREENSHOTS_DIR ?? join(REPO, "docs", "screenshots");
  mkdirSync(dir, { recursive: true });
  return join(dir, `${name}.png`);
}

/** Saves `page` at desktop and phone width as NAME-desktop.png and NAME-phone.png, and scans both. */
export async function captureBothWidths(
  page: Page,
  name: string,
  settle: () => Promise<void>,
  options: { fullPage?: boolean } = {},
): Promise<void> {
  for (const [size, viewport] of [
    ["desktop", DESKTOP],
    ["phone", PHONE],
  ] as const) {
    await page.setViewportSize(viewport);
    await settle();
    await page.screenshot({
      path: screenshotPath(`${name}-${size}`),
      animations: "disabled",
      caret: "hide",
      fullPage: options.fullPage ?? false,
    });
    await assertAccessible(page, `${name} at ${size} width`);
  }
  await page.setViewportSize(DESKTOP);
}

/**
 * An OpenAI-compatible stand-in whose models all fail: `busy-model` is
 * throttled (429), `down-model` is down (503). It counts the calls.
 */
export async function startFailingModelServer(): Promise<{ baseUrl: string; calls: Map<string, number>; close(): Promise<void> }> {
  const calls = new Map<string, number>();
  const server: Server = createServer((request, response) => {
    let body = "";
    request.setEncoding("utf8");
    request.on("data", (text: string) => (body += text));
    request.on("end", () => {
      let model = "";
      try {
        model = String((JSON.parse(body) as { model?: unknown }).model ?? "");
      } catch {
        // Counted under "" below.
      }
      calls.set(model, (calls.get(model) ?? 0) + 1);
      const [status, type, message] =
        model === "busy-model"
          ? [429, "rate_limit_exceeded", "Rate limit reached, please try again later."]
          : [503, "service_unavailable", "The server is overloaded or not ready yet."];
      response.writeHead(status, { "content-type": "application/json", "retry-after": "1" });
      response.end(JSON.stringify({ error: { message, type, param: null, code: type } }));
    });
  });
  await new Promise<void>((listening) => server.listen(0, "127.0.0.1", listening));
  const { port } = server.address() as AddressInfo;
  return {
    baseUrl: `http://127.0.0.1:${port}/v1`,
    calls,
    close: () => new Promise((closed) => server.close(() => closed())),
  };
}

/** Writes a routes file into a fresh directory and returns its path. */
export function routesFile(yaml: string): string {
  const dir = mkdtempSync(join(tmpdir(), "parley-routes-"));
  const path = join(dir, "routes.yaml");
  writeFileSync(path, yaml);
  return path;
}

/** Paced replies on the simulated model: about 12 words a second. */
export const PACE = {
  PARLEY_SIMULATED_FIRST_TOKEN_MILLIS: "300",
  PARLEY_SIMULATED_TOKENS_PER_SECOND: "12",
  PARLEY_SIMULATED_REPLY_TOKENS: "0",
};

/** Words w1 … wN: a prompt the simulated model echoes word by word. */
export function words(count: number, prefix = "w"): string {
  return Array.from({ length: count }, (_, index) => `${prefix}${index + 1}`).join(" ");
}

/** Starts recording the length of the reply being written in `listSelector` at every DOM change, with the time. */
export async function recordGrowth(page: Page, listSelector: string): Promise<void> {
  await page.evaluate((selector) => {
    const record: Array<[number, number]> = [];
    (window as unknown as { growth: typeof record }).growth = record;
    const list = document.querySelector(selector) as Element;
    new MutationObserver(() => {
      const body = list.querySelector(".message.assistant.streaming .body");
      if (body) record.push([performance.now(), (body.textContent ?? "").length]);
    }).observe(list, { subtree: true, childList: true, characterData: true });
  }, listSelector);
}

/**
 * Checks what `recordGrowth` saw: the text grew in many steps, only grew,
 * and over more than a second (chunk by chunk, not at once). Returns the
 * distinct lengths in order.
 */
export async function assertGrewOverTime(page: Page): Promise<{ lengths: number[] }> {
  const growth = await page.evaluate(() => (window as unknown as { growth: Array<[number, number]> }).growth);
  const lengths = [...new Set(growth.map(([, length]) => length))];
  assert.ok(lengths.length >= 8, `the reply grew in ${lengths.length} steps: ${lengths.join(", ")}`);
  assert.deepEqual(lengths, [...lengths].sort((a, b) => a - b), "the text only grows");
  const [first, last] = [growth[0], growth.at(-1)];
  assert.ok(first && last && last[0] - first[0] > 1000, "growth is spread over time, chunk by chunk");
  return { lengths };
}

/** Sends `message` from the chat page. */
export async function send(page: Page, message: string): Promise<void> {
  await page.getByRole("textbox", { name: "Message" }).fill(message);
  await page.getByRole("button", { name: "Send" }).click();
}

/** The chat page's last reply. */
export const lastReply = (page: Page) => page.locator(".messages .message.assistant").last();

/** Waits until the chat page's last reply is over (its meta line says how) and returns its text. */
export async function finishedReply(page: Page, meta: RegExp = /Cost .* credits/): Promise<string> {
  const reply = lastReply(page);
  await reply.locator(".meta", { hasText: meta }).waitFor({ timeout: 30_000 });
  return (await reply.locator(".body").textContent()) ?? "";
}

/** Dev sign-in on the page at `path` (default `/`) as `sub`, with a role and cohorts; resolves once signed in. */
export async function devSignIn(
  page: Page,
  service: Service,
  sub: string,
  options: { role?: "user" | "supervisor" | "admin"; cohorts?: string[]; path?: string } = {},
): Promise<void> {
  await page.goto(`${service.base}${options.path ?? "/"}`);
  await page.getByLabel("User id").fill(sub);
  await page.getByLabel("Role").selectOption(options.role ?? "user");
  await page.getByLabel("Cohorts").fill((options.cohorts ?? []).join(", "));
  await page.getByRole("button", { name: "Dev sign-in" }).click();
  await page.getByRole("button", { name: "Sign out" }).waitFor();
}

/** Two animation frames: layout and paint have caught up. */
export async function settled(page: Page): Promise<void> {
  await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
}

/** The accessible name of the focused element, as the keyboard tests compare it. */
export function focusedName(page: Page): Promise<string> {
  return page.evaluate(() => {
    const element = document.activeElement as HTMLElement | null;
    if (element === null || element === document.body) return "";
    const labels = (element as HTMLInputElement).labels;
    const label = labels && labels.length > 0 ? labels[0]?.textContent : null;
    const labelledBy = element.getAttribute("aria-labelledby");
    const byId = labelledBy === null ? null : document.getElementById(labelledBy)?.textContent;
    return (element.getAttribute("aria-label") ?? byId ?? label ?? element.textContent ?? "").trim();
  });
}

/** Presses Tab until `name` has the focus; the names passed on the way. */
export async function tabTo(page: Page, name: string): Promise<string[]> {
  const passed: string[] = [];
  for (let presses = 0; presses < 30; presses++) {
    await page.keyboard.press("Tab");
    const now = await focusedName(page);
    passed.push(now);
    if (now === name) return passed;
  }
  throw new Error(`Tab never reached ${name}: ${passed.join(" | ")}`);
}

/**
 * A TCP proxy in front of the service whose connections the test can cut
 * (`drop`), as a network failure would: the browser sees its streams break.
 */
export async function startCuttableProxy(
  target: string,
): Promise<{ base: string; drop(): number; close(): Promise<void> }> {
  const { hostname, port } = new URL(target);
  const sockets = new Set<Socket>();
  const track = (socket: Socket): void => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  };
  const server = createTcpServer((client) => {
    const upstream = connect(Number(port), hostname);
    track(client);
    track(upstream);
    client.pipe(upstream);
    upstream.pipe(client);
    client.once("error", () => upstream.destroy());
    upstream.once("error", () => client.destroy());
    client.once("close", () => upstream.destroy());
    upstream.once("close", () => client.destroy());
  });
  await new Promise<void>((listening) => server.listen(0, "127.0.0.1", listening));
  const address = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${address.port}`,
    drop() {
      const count = sockets.size;
      for (const socket of sockets) socket.destroy();
      return count;
    },
    close: () =>
      new Promise((closed) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => closed());
      }),
  };
}
