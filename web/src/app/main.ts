/** Entry point: sign-in, or the signed-in page at this path. */

import "../styles/app.css";
import { ReplyCheckpoints } from "../client/index.js";
import { forgetIdentity, savedIdentity, type Identity } from "./auth.js";
import { h, replaceChildren } from "./dom.js";
import { rolesList } from "./messages.js";
import { PAGES } from "./pages.js";
import { renderShell } from "./shell.js";
import { renderSignIn } from "./signin.js";

const root = document.getElementById("app") as HTMLElement;

function signOut(reason?: string): void {
  forgetIdentity();
  // A reply being followed belongs to the one signing out.
  new ReplyCheckpoints().clear();
  void renderSignIn(root, reason, show);
}

function show(identity: Identity): void {
  const path = location.pathname;
  const page = PAGES.get(path);
  const { context, main } = renderShell(root, identity, PAGES, path, signOut);
  if (page === undefined || !page.roles.includes(identity.role)) void context.refreshBalance();
  if (page === undefined) {
    main.classList.add("plain");
    replaceChildren(
      main,
      h("h2", {}, "Page not found"),
      h("p", {}, "There is no such page here. ", h("a", { href: "/" }, "Go to the chat.")),
    );
    return;
  }
  if (!page.roles.includes(identity.role)) {
    // The service refuses this role anyway; the page says so before asking it.
    document.title = "Not for you · Parley";
    main.classList.add("plain");
    replaceChildren(
      main,
      h("h2", {}, "Not available to you"),
      h(
        "p",
        { class: "notice", role: "alert" },
        `“${page.label}” is part of the supervisor console, for ${rolesList(page.roles)} only. ` +
          `You are signed in as ${identity.sub}, a ${identity.role}.`,
      ),
      h("p", {}, h("a", { href: "/" }, "Go to your chats"), " or sign out and sign in with another account."),
    );
    return;
  }
  page.render(context, main).catch((error: unknown) => {
    replaceChildren(main, h("p", { class: "notice", role: "alert" }, context.fail(error)));
  });
}

const identity = savedIdentity();
if (identity === null) void renderSignIn(root, undefined, show);
else show(identity);
