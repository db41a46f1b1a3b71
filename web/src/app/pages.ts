/**
 * The signed-in pages, by path. Each is a client-side route of the one
 * `index.html` (the service answers `index.html` at every path listed in
 * `service/src/routes/pages.rs`, which must name the same paths).
 */

import { renderAudit } from "./audit.js";
import { renderChat } from "./chat.js";
import { renderConsole } from "./console.js";
import { renderCredits } from "./credits.js";
import type { PageDefinition } from "./shell.js";

export const PAGES: ReadonlyMap<string, PageDefinition> = new Map([
  ["/", { label: "Chat", roles: ["user", "supervisor", "admin"], render: renderChat }],
  // The supervisor console.
  ["/console", { label: "Live replies", roles: ["supervisor", "admin"], render: renderConsole }],
  ["/console/audit", { label: "Audit", roles: ["supervisor", "admin"], render: renderAudit }],
  ["/console/credits", { label: "Credits", roles: ["admin"], render: renderCredits }],
]);
