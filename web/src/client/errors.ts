/**
 * Typed errors of the Parley API. Every error answer is `{code, message}`
 * (plus details for some codes); `apiError` turns a response into the
 * matching class, so callers can `instanceof` what they handle.
 */

export interface ErrorBody {
  code: string;
  message: string;
  field?: string;
  fields?: string[];
  allowed?: string[];
  balance?: number;
  available?: number;
  requiredCredits?: number;
}

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly body: ErrorBody;

  constructor(status: number, body: ErrorBody) {
    super(body.message);
    this.name = new.target.name;
    this.status = status;
    this.code = body.code;
    this.body = body;
  }
}

/** 401: no token, or the token was rejected (expired, bad signature…). */
export class UnauthorizedError extends ApiError {}

/** 402 `INSUFFICIENT_CREDITS`: the reply's worst case is more than the caller has. */
export class InsufficientCreditsError extends ApiError {
  get available(): number | undefined {
    return this.body.available;
  }
  get requiredCredits(): number | undefined {
    return this.body.requiredCredits;
  }
}

/** 403. */
export class ForbiddenError extends ApiError {}

/** 404 (`SESSION_NOT_FOUND`, `NOT_FOUND`, …). */
export class NotFoundError extends ApiError {}

/** 404 `NO_ACTIVE_REPLY`: no reply of the caller is running in that session. */
export class NoActiveReplyError extends NotFoundError {}

/** 409 `REPLY_IN_PROGRESS`: the session already has a reply running. */
export class ReplyInProgressError extends ApiError {}

/** 400, 413, 415, 422: the request was refused as invalid. */
export class InvalidRequestError extends ApiError {}

/** A refusal that names when to try again (`Retry-After`). */
export class RetryableError extends ApiError {
  /** Seconds to wait, from `Retry-After`, when the answer had one. */
  readonly retryAfterSeconds: number | undefined;

  constructor(status: number, body: ErrorBody, retryAfterSeconds: number | undefined) {
    super(status, body);
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

/** 429: a rate limit (`RATE_LIMITED`) or a throttled model (`MODEL_THROTTLED`). */
export class RateLimitedError extends RetryableError {}

/** 503: a store, ledger, model or the service itself is unavailable. */
export class ServiceUnavailableError extends RetryableError {}

/** Any other answer the client does not expect (500, 502, 504…). */
export class ServerError extends ApiError {}

/** The request did not get an answer: network down, connection refused or cut. */
export class NetworkError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "NetworkError";
  }
}

/** Seconds from a `Retry-After` value (delta-seconds or an HTTP date). */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null) return undefined;
  const trimmed = value.trim();
  if (/^[0-9]+$/.test(trimmed)) return Number(trimmed);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

/** The typed error of a non-2xx response (its body is read). */
export async function apiError(response: Response): Promise<ApiError> {
  const body = await errorBody(response);
  const status = response.status;
  const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
  switch (status) {
    case 401:
      return new UnauthorizedError(status, body);
    case 402:
      return new InsufficientCreditsError(status, body);
    case 403:
      return new ForbiddenError(status, body);
    case 404:
      return body.code === "NO_ACTIVE_REPLY"
        ? new NoActiveReplyError(status, body)
        : new NotFoundError(status, body);
    case 409:
      return body.code === "REPLY_IN_PROGRESS"
        ? new ReplyInProgressError(status, body)
        : new ApiError(status, body);
    case 400:
    case 413:
    case 415:
    case 422:
      return new InvalidRequestError(status, body);
    case 429:
      return new RateLimitedError(status, body, retryAfter);
    case 503:
      return new ServiceUnavailableError(status, body, retryAfter);
    default:
      return new ServerError(status, body);
  }
}

async function errorBody(response: Response): Promise<ErrorBody> {
  const fallback: ErrorBody = {
    code: `HTTP_${response.status}`,
    message: response.statusText || `HTTP ${response.status}`,
  };
  try {
    const parsed: unknown = await response.json();
    if (
      typeof parsed === "object" &&
      parsed !== null &&
      typeof (parsed as ErrorBody).code === "string" &&
      typeof (parsed as ErrorBody).message === "string"
    ) {
      return parsed as ErrorBody;
    }
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  return fallback;
}
