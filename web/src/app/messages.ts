/** What the page says about errors and amounts, in one place. */

import {
  ForbiddenError,
  InsufficientCreditsError,
  InvalidRequestError,
  NetworkError,
  NotFoundError,
  RateLimitedError,
  ReplyInProgressError,
  ServiceUnavailableError,
  UnauthorizedError,
  type ErrorEventData,
  type Role,
  type SessionObserver,
} from "../client/index.js";

/** Credits with up to 6 decimals, trailing zeros dropped. */
export function credits(amount: number): string {
  return amount.toLocaleString("en", { maximumFractionDigits: 6 });
}

export function describeError(error: unknown): string {
  if (error instanceof InsufficientCreditsError) {
    const need = error.requiredCredits;
    const have = error.available;
    const detail =
      need !== undefined && have !== undefined
        ? ` This reply could cost up to ${credits(need)} credits and you have ${credits(have)} available.`
        : "";
    return `You are out of credits.${detail} Ask an administrator for more credits, or pick a cheaper model.`;
  }
  if (error instanceof RateLimitedError) {
    const wait = error.retryAfterSeconds;
    const when = wait === undefined ? "in a moment" : `in ${wait} second${wait === 1 ? "" : "s"}`;
    return error.code === "MODEL_THROTTLED"
      ? `The model is busy (throttled). Try again ${when}.`
      : `You are sending requests too fast (rate limited). Try again ${when}.`;
  }
  if (error instanceof ReplyInProgressError) {
    return "This chat already has a reply in progress (perhaps in another tab). Wait for it to finish, or show it here.";
  }
  if (error instanceof ServiceUnavailableError) {
    const wait = error.retryAfterSeconds;
    return `The service is unavailable right now (${error.code}). Try again ${wait === undefined ? "shortly" : `in ${wait} s`}.`;
  }
  if (error instanceof UnauthorizedError) return `Your sign-in was refused (${error.message}). Sign in again.`;
  if (error instanceof ForbiddenError) {
    return error.code === "OBSERVATION_DISABLED"
      ? "Watching replies is turned off on this service."
      : `You are not allowed to do that (${error.message}).`;
  }
  if (error instanceof NotFoundError) return "That chat no longer exists.";
  if (error instanceof InvalidRequestError) return `The service refused the request: ${error.message}.`;
  if (error instanceof NetworkError) return `The service cannot be reached: ${error.message}.`;
  if (error instanceof Error) return `Something went wrong: ${error.message}.`;
  return "Something went wrong.";
}

/** The sentence for an `error` event that ended a reply. */
export function describeReplyError(data: ErrorEventData): string {
  switch (data.code) {
    case "CANCELLED":
      return "Reply stopped. What was written so far is kept.";
    case "SHUTTING_DOWN":
      return "The service is restarting; the reply was cut short and what was written so far is kept.";
    case "MODEL_THROTTLED":
      return "The model is busy (throttled) and no fallback model could answer. Try again in a moment.";
    case "MODEL_UNAVAILABLE":
      return "The model is down right now and no fallback model could answer. Try again later or pick another model.";
    case "MODEL_TIMEOUT":
      return "The model took too long to answer. Try again or pick another model.";
    case "CONTEXT_WINDOW_EXCEEDED":
      return "This chat is too long for the model. Start a new chat.";
    case "INSUFFICIENT_CREDITS":
      return "You ran out of credits for this reply.";
    default:
      return data.code.startsWith("MODEL_")
        ? `The model failed (${data.code}). Try again or pick another model.`
        : `The reply ended early: ${data.message} (${data.code}).`;
  }
}

/** A moment: the time alone today, else the date and time (the reader's locale). */
export function when(iso: string, now: Date = new Date()): string {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const today = date.toDateString() === now.toDateString();
  return today
    ? date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** "supervisors and admins" */
export function rolesList(roles: ReadonlyArray<Role>): string {
  const names = roles.map((role) => `${role}s`);
  return names.length <= 1 ? (names[0] ?? "") : `${names.slice(0, -1).join(", ")} and ${names.at(-1)}`;
}

/** "sam (supervisor)" */
export function personWithRole(id: string, role: string): string {
  return `${id} (${role})`;
}

/** Who observed a conversation, each once, newest first: "sam (supervisor) and 2 others". */
export function observersSummary(observers: ReadonlyArray<SessionObserver>): string {
  const people = [...new Set(observers.map((observer) => personWithRole(observer.observerId, observer.observerRole)))];
  const shown = people.slice(0, 2);
  const others = people.length - shown.length;
  return others === 0 ? shown.join(" and ") : `${shown.join(", ")} and ${others} other${others === 1 ? "" : "s"}`;
}

/** How a reply ended, from the outcome the service reports. */
export function replyOutcome(outcome: string | undefined): string {
  switch (outcome) {
    case "completed":
      return "completed";
    case "failed":
      return "failed (the model)";
    case "interrupted":
      return "cut short by the model";
    case "abandoned":
      return "stopped (the user stopped it or left)";
    case "shutdown":
      return "cut short by a service restart";
    case "unpaid":
      return "cut short (credits could not be kept)";
    case "max_duration":
      return "cut short (too long)";
    case "lost":
      return "lost (its replica stopped)";
    case undefined:
      return "ended";
    default:
      return outcome;
  }
}

/** How an observation ended, from the audit. */
export function observationOutcome(outcome: string | undefined): string {
  switch (outcome) {
    case "left":
      return "left";
    case "too_slow":
      return "cut off (fell behind)";
    case "shutdown":
      return "service restarted";
    case undefined:
      return "";
    default:
      return outcome;
  }
}
