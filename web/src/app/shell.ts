/**
 * The frame every signed-in page shares: header (pages, credits, who is
 * signed in, sign out), the main region, and one polite live region for
 * announcements. Pages are registered in `pages.ts` by path; each gets an
 * `AppContext` with the API client and the shell's services.
 */

import { ParleyClient, UnauthorizedError } from "../client/index.js";
import type { Identity } from "./auth.js";
import { h, replaceChildren } from "./dom.js";
import { credits, describeError } from "./messages.js";

export interface AppContext {
  identity: Identity;
  client: ParleyClient;
  /** Says `text` to screen readers (polite). */
  announce(text: string): void;
  /** Shows the caller's available credits. */
  showBalance(available: number): void;
  /** Fetches and shows the caller's available credits. */
  refreshBalance(): Promise<void>;
  /** Signs out and shows the sign-in page with `reason`. */
  signOut(reason?: string): void;
  /** Aborted at sign-out: pages pass it to what they stream, so nothing outlives the sign-in. */
  signal: AbortSignal;
  /** Handles an error a page cannot: a refused token signs out. */
  fail(error: unknown): string;
}

export interface PageDefinition {
  /** Link text in the header. */
  label: string;
  /** Roles that may open the page (the service enforces its own rules too). */
  roles: ReadonlyArray<Identity["role"]>;
  render(context: AppContext, main: HTMLElement): Promise<void>;
}

export function renderShell(
  root: HTMLElement,
  identity: Identity,
  pages: ReadonlyMap<string, PageDefinition>,
  currentPath: string,
  signOut: (reason?: string) => void,
): { context: AppContext; main: HTMLElement } {
  const client = new ParleyClient({ token: () => identity.token });
  const signedIn = new AbortController();
  const leave = (reason?: string): void => {
    signedIn.abort();
    signOut(reason);
  };
  const balance = h("strong", { class: "balance-amount" }, "…");
  const live = h("div", { id: "live", class: "sr-only", role: "status", "aria-live": "polite" });
  const main = h("main", { id: "main", tabindex: -1 });
  const links = [...pages.entries()]
    .filter(([, page]) => page.roles.includes(identity.role))
    .map(([path, page]) =>
      h("li", {}, h("a", { href: path, "aria-current": path === currentPath ? "page" : undefined }, page.label)),
    );
  const header = h(
    "header",
    { class: "topbar" },
    h("h1", { class: "brand" }, "Parley"),
    h("nav", { "aria-label": "Pages" }, h("ul", {}, ...links)),
    h(
      "div",
      { class: "account" },
      h("p", { class: "balance" }, h("span", {}, "Credits "), balance),
      h("p", { class: "who" }, h("span", { class: "sr-only" }, "Signed in as "), identity.sub, ` (${identity.role})`),
      h("button", { type: "button", class: "secondary", on: { click: () => leave() } }, "Sign out"),
    ),
  );
  const skip = h("a", { class: "skip-link", href: "#main" }, "Skip to content");
  // Focus moves to the content itself (a fragment link alone does not move it everywhere).
  skip.addEventListener("click", (event) => {
    event.preventDefault();
    main.focus();
  });
  replaceChildren(root, skip, header, main, live);

  const context: AppContext = {
    identity,
    client,
    announce(text) {
      // Cleared first, so the same sentence twice is announced twice.
      live.textContent = "";
      window.setTimeout(() => (live.textContent = text), 50);
    },
    showBalance(available) {
      balance.textContent = credits(available);
    },
    async refreshBalance() {
      try {
        const answer = await client.balance();
        context.showBalance(answer.available);
      } catch (error) {
        context.fail(error);
      }
    },
    signOut: leave,
    signal: signedIn.signal,
    fail(error) {
      if (error instanceof UnauthorizedError) leave(describeError(error));
      return describeError(error);
    },
  };
  return { context, main };
}
