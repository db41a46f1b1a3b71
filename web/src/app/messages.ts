/** What the page says about errors and amounts, in one place. */

import {
  InsufficientCreditsError,
  InvalidRequestError,
  NetworkError,
  NotFoundError,
  RateLimitedError,
  ReplyInProgressError,
  ServiceUnavailableError,
  UnauthorizedError,
  type ErrorEventData,
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
