/** Waiting between reconnection attempts, shared by every stream of the client. */

export const MAX_RECONNECT_DELAY_MS = 5000;

/**
 * The wait before attempt `failures` (1, 2, …): the server's `retry` when it
 * sent one, else `firstDelayMs` doubling, at most 5 s.
 */
export function reconnectDelay(failures: number, firstDelayMs: number, serverDelayMs: number | undefined): number {
  if (serverDelayMs !== undefined) return serverDelayMs;
  return Math.min(firstDelayMs * 2 ** (failures - 1), MAX_RECONNECT_DELAY_MS);
}

/** Resolves after `milliseconds`, or rejects with the signal's reason when it is aborted. */
export function sleep(milliseconds: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, milliseconds);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}
