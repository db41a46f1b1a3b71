/** Entry point: sign-in, or the signed-in page at this path. */

import "../styles/app.css";
import { ReplyCheckpoints } from "../client/index.js";
import { forgetIdentity, savedIdentity, type Identity } from "./auth.js";
import { h, replaceChildren } from "./dom.js";
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
  if (page === undefined || !page.roles.includes(identity.role)) {
    replaceChildren(
      main,
      h("h2", {}, "Page not found"),
      h("p", {}, "There is no such page for you here. ", h("a", { href: "/" }, "Go to the chat.")),
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
