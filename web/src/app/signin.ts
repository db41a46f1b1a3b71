/**
 * Sign-in: paste a bearer token, or — only when the service offers it (local
 * mode on its generated dev secret) — dev sign-in as any user and role.
 */

import { ParleyClient, type Role } from "../client/index.js";
import { identityOf, saveIdentity, type Identity } from "./auth.js";
import { h, replaceChildren } from "./dom.js";
import { describeError } from "./messages.js";

export async function renderSignIn(
  root: HTMLElement,
  reason: string | undefined,
  signedIn: (identity: Identity) => void,
): Promise<void> {
  const status = h("p", { class: "notice", role: "alert", hidden: reason === undefined }, reason ?? "");
  const say = (text: string): void => {
    status.textContent = text;
    status.hidden = false;
  };
  /** Checks the token against the service before keeping it. */
  const tryToken = async (token: string): Promise<void> => {
    const identity = identityOf(token);
    if (typeof identity === "string") {
      say(identity);
      return;
    }
    try {
      await new ParleyClient({ token: () => identity.token }).balance();
    } catch (error) {
      say(describeError(error));
      return;
    }
    saveIdentity(identity);
    signedIn(identity);
  };

  const tokenInput = h("textarea", {
    id: "token",
    name: "token",
    rows: 4,
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    "aria-describedby": "token-help",
  });
  const tokenForm = h(
    "form",
    { class: "stack", "aria-labelledby": "token-heading" },
    h("h2", { id: "token-heading" }, "Sign in with a token"),
    h("label", { for: "token" }, "Bearer token (JWT)"),
    tokenInput,
    h(
      "p",
      { id: "token-help", class: "help" },
      "Your organisation gives you a token. On a local service, ",
      h("code", {}, "parley-service token --sub NAME"),
      " prints one.",
    ),
    h("button", { type: "submit" }, "Sign in"),
  );
  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void tryToken(tokenInput.value);
  });

  const main = h(
    "main",
    { id: "main", class: "signin" },
    h("h1", { class: "brand" }, "Parley"),
    h("p", { class: "lede" }, "Metered, supervised chat with language models."),
    status,
    tokenForm,
  );
  replaceChildren(root, main);

  let offered;
  try {
    offered = await new ParleyClient({ token: () => null }).devSignIn();
  } catch {
    offered = null;
  }
  if (offered === null) return;
  const sub = h("input", { id: "dev-sub", name: "sub", value: "dev", required: true, autocomplete: "username" });
  const role = h(
    "select",
    { id: "dev-role", name: "role" },
    ...offered.roles.map((name) => h("option", { value: name }, name)),
  );
  const cohorts = h("input", { id: "dev-cohorts", name: "cohorts", value: "", "aria-describedby": "dev-cohorts-help" });
  const devForm = h(
    "form",
    { class: "stack dev", "aria-labelledby": "dev-heading" },
    h("h2", { id: "dev-heading" }, "Dev sign-in"),
    h(
      "p",
      { class: "help" },
      "This service runs in local mode with a generated dev secret, so it signs you in as anyone. " +
        "Services with a real identity provider never offer this.",
    ),
    h("label", { for: "dev-sub" }, "User id"),
    sub,
    h("label", { for: "dev-role" }, "Role"),
    role,
    h("label", { for: "dev-cohorts" }, "Cohorts"),
    cohorts,
    h("p", { id: "dev-cohorts-help", class: "help" }, "Comma-separated, e.g. class-a, class-b."),
    h("button", { type: "submit" }, "Dev sign-in"),
  );
  devForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const fields = {
      sub: sub.value.trim(),
      role: role.value as Role,
      cohorts: cohorts.value
        .split(",")
        .map((cohort) => cohort.trim())
        .filter((cohort) => cohort !== ""),
    };
    new ParleyClient({ token: () => null })
      .devToken(fields)
      .then((minted) => tryToken(minted.token))
      .catch((error: unknown) => say(describeError(error)));
  });
  main.appendChild(devForm);
}
