/**
 * Who is signed in: the bearer token, kept in `sessionStorage` (it survives
 * a reload, and ends with the tab), and what its claims say. The claims are
 * decoded only to show them; the service verifies every request.
 */

import type { Role } from "../client/index.js";

const TOKEN_KEY = "parley.token";

export interface Identity {
  token: string;
  sub: string;
  role: Role;
  cohorts: string[];
  /** Expiry, ms since the epoch (undefined: none stated). */
  expiresAt: number | undefined;
}

/** The claims of a JWT, or an error message saying why it is not one. */
export function identityOf(token: string): Identity | string {
  const parts = token.trim().split(".");
  if (parts.length !== 3) return "That is not a JWT (three dot-separated parts).";
  let claims: Record<string, unknown>;
  try {
    const base64 = (parts[1] as string).replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
    claims = JSON.parse(new TextDecoder().decode(bytes)) as Record<string, unknown>;
  } catch {
    return "The token's claims cannot be read.";
  }
  const role = claims.role;
  if (typeof claims.sub !== "string" || (role !== "user" && role !== "supervisor" && role !== "admin")) {
    return "The token has no Parley user (sub) and role.";
  }
  const expiresAt = typeof claims.exp === "number" ? claims.exp * 1000 : undefined;
  if (expiresAt !== undefined && expiresAt <= Date.now()) return "The token has expired.";
  return {
    token: token.trim(),
    sub: claims.sub,
    role,
    cohorts: Array.isArray(claims.cohorts) ? claims.cohorts.filter((c): c is string => typeof c === "string") : [],
    expiresAt,
  };
}

export function savedIdentity(): Identity | null {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token === null) return null;
  const identity = identityOf(token);
  if (typeof identity === "string") {
    sessionStorage.removeItem(TOKEN_KEY);
    return null;
  }
  return identity;
}

export function saveIdentity(identity: Identity): void {
  sessionStorage.setItem(TOKEN_KEY, identity.token);
}

export function forgetIdentity(): void {
  sessionStorage.removeItem(TOKEN_KEY);
}
