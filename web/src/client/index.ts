/**
 * Parley's browser client library: the chat API with typed errors, replies
 * streamed from the POST itself (fetch + ReadableStream, no EventSource),
 * a standards-following SSE parser, re-attachment with Last-Event-ID after
 * a dropped connection or a page reload, and the observation streams of the
 * supervisor console (reconnecting by themselves). web/README.md documents it.
 */

export { ParleyClient, ReplyStream } from "./api.js";
export type { ClientOptions, FetchLike, ReplyOptions } from "./api.js";
export { OBSERVER_TOO_SLOW, liveEvent, observeEvent, replyEvent } from "./events.js";
export type { ServerReplyEvent } from "./events.js";
export { followEvents } from "./follow.js";
export type { FollowOptions, OpenStream } from "./follow.js";
export { ReplyCheckpoints, checkpointed } from "./checkpoints.js";
export type { ReplyCheckpoint } from "./checkpoints.js";
export * from "./errors.js";
export { SseParser, readSse } from "./sse.js";
export type { SseEvent, SseHandlers } from "./sse.js";
export type * from "./types.js";
