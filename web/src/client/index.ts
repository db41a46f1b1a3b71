/**
 * Parley's browser client library: the chat API with typed errors, replies
 * streamed from the POST itself (fetch + ReadableStream, no EventSource),
 * a standards-following SSE parser, and re-attachment with Last-Event-ID
 * after a dropped connection or a page reload. web/README.md documents it.
 */

export { ParleyClient, ReplyStream, replyEvent } from "./api.js";
export type { ClientOptions, FetchLike, ReplyOptions, ServerReplyEvent } from "./api.js";
export { ReplyCheckpoints, checkpointed } from "./checkpoints.js";
export type { ReplyCheckpoint } from "./checkpoints.js";
export * from "./errors.js";
export { SseParser, readSse } from "./sse.js";
export type { SseEvent, SseHandlers } from "./sse.js";
export type * from "./types.js";
