#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/ (committed; run again after
changing a seed): valid and nearly valid inputs of each target, so that the
fuzzer starts from the shapes the service really reads.

    python3 fuzz/make_seeds.py
"""
import base64
import binascii
import hashlib
import hmac
import json
import pathlib
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
# Must match parley_fuzz::{JWT_SECRET, JWT_ISSUER, JWT_AUDIENCE}.
JWT_SECRET = b"parley-fuzz-secret"
JWT_ISSUER = "parley-fuzz"
JWT_AUDIENCE = "parley"
FAR_FUTURE = 4102444800  # 2100-01-01


def write(target, name, data):
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (directory / name).write_bytes(data)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(header, claims, key=JWT_SECRET):
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def routes_seeds():
    write("routes_file", "one-route.yaml", """routes:
  - alias: default
    targets:
      - provider: simulated
        model: simulated-small
        pricing: {inputPer1k: 0, outputPer1k: 0.1}
        maxOutputTokens: 512
        timeoutSeconds: 10
""")
    write("routes_file", "fallbacks-and-limits.yaml", """defaultRoute: default
routes:
  - alias: default
    allowedRoles: [user, supervisor, admin]
    fallbackOn: [throttled, unavailable, timeout]
    downgradeWhenUnaffordable: true
    targets:
      - provider: bedrock
        model: amazon.nova-micro-v1:0
        pricing: {inputPer1k: 1, outputPer1k: 4}
        maxOutputTokens: 1024
        timeoutSeconds: 60
      - provider: openai
        model: qwen2.5-7b-instruct
        pricing: {inputPer1k: 0.5, outputPer1k: 1.5}
        maxOutputTokens: 1024
        timeoutSeconds: 90
  - alias: fast
    allowedRoles: [supervisor, admin]
    limits: {requestsPerMinute: 30, concurrentStreams: 2}
    targets:
      - provider: simulated
        model: simulated-fast
        pricing: {inputPer1k: 0.25, outputPer1k: 0.000001}
        maxOutputTokens: 256
""")
    write("routes_file", "invalid.yaml", """defaultRoute: missing
routes:
  - alias: "Not An Alias!"
    targets: []
  - alias: dup
    targets:
      - {provider: simulated, model: m, pricing: {inputPer1k: -1, outputPer1k: 0.0000001}, maxOutputTokens: 0}
  - alias: dup
    targets:
      - {provider: openai, model: m, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 2000000, timeoutSeconds: 0}
""")


def jwt_seeds():
    claims = {"sub": "alice", "role": "user", "cohorts": ["c1"], "iss": JWT_ISSUER,
              "aud": JWT_AUDIENCE, "iat": 1700000000, "nbf": 1700000000, "exp": FAR_FUTURE}
    hs256 = {"alg": "HS256", "typ": "JWT"}
    write("jwt", "valid", "Bearer " + jwt(hs256, claims))
    write("jwt", "supervisor", "Bearer " + jwt(hs256, dict(claims, role="supervisor", cohorts=["c1", "c2"])))
    write("jwt", "expired", "Bearer " + jwt(hs256, dict(claims, exp=1700000100)))
    write("jwt", "wrong-key", "Bearer " + jwt(hs256, claims, key=b"another secret"))
    write("jwt", "unknown-role", "Bearer " + jwt(hs256, dict(claims, role="root")))
    write("jwt", "alg-none", "Bearer " + b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims).encode()) + ".")
    write("jwt", "rs256-kid", "Bearer " + b64(b'{"alg":"RS256","kid":"k1"}') + "." + b64(json.dumps(claims).encode()) + ".c2ln")
    write("jwt", "lowercase-scheme", "bearer " + jwt(hs256, claims))


def sse_seeds():
    # Four control bytes (two cuts of the text, two of the wire), then the text.
    torture = "line\nnext\r\nwin\rmac \\n \"quoted\" data: fake\n\nevent: x\nid: 9\n😀👍🏽 中文字 end"
    write("sse_frames", "torture", b"\x10\x80\x20\xf0" + torture.encode())
    write("sse_frames", "plain", b"\x00\xff\x00\xff" + b"Hello there, how are you?")
    write("sse_frames", "bom-and-controls", b"\x55\xaa\x01\x02" + "\ufeff\x00\x1b[31m\u2028\u2029".encode())


def openai_seeds():
    def chunk(content=None, finish=None, usage=None):
        body = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
        if content is not None or finish is not None:
            body["choices"] = [{"index": 0, "delta": {} if content is None else {"content": content},
                                "finish_reason": finish}]
        if usage:
            body["usage"] = usage
        return "data: " + json.dumps(body) + "\n\n"

    reply = (chunk("Hel") + chunk("lo\nthere") + chunk(finish="stop")
             + chunk(usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
             + "data: [DONE]\n\n")
    write("openai_stream", "reply", b"\x40\x80\xc0" + reply.encode())
    write("openai_stream", "no-done", b"\x00\x00\x00" + (chunk("hi") + chunk(finish="length")).encode())
    error = 'data: {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}\n\n'
    write("openai_stream", "error", b"\x10\x20\x30" + (chunk("partial") + error).encode())
    # As OpenAI starts a reply: the role with empty content, then text, then
    # a finish with null content.
    role_first = ('data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
                  + chunk("Hi") + 'data: {"choices": [{"index": 0, "delta": {"content": null}, "finish_reason": "stop"}]}\n\n'
                  + "data: [DONE]\n\n")
    write("openai_stream", "role-first", b"\x20\x60\xa0" + role_first.encode())
    write("openai_stream", "crlf-comments", b"\x01\x02\x03" + (": keep-alive\r\n\r\n" + chunk("x").replace("\n", "\r\n")).encode())
    # One chunk's JSON each: the shapes the fast path reads, and near misses
    # it must leave to serde_json.
    chunks = {
        "openai": '{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini",'
                  '"system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" Hello"},"logprobs":null,'
                  '"finish_reason":null}],"usage":null}',
        "role-first": '{"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}',
        "finish": '{"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        "escapes": '{ "choices" : [ { "delta" : { "content" : "a\\n\\"b\\"\\t\u00e9 \\u00e9" } } ] }',
        "usage": '{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":64,"total_tokens":76}}',
        "two-choices": '{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}',
        "duplicate": '{"choices":[{"delta":{"content":"a","content":"b"}}]}',
        "numbers": '{"created":-0,"index":01,"x":1.5e3,"choices":[]}',
    }
    for name, body in chunks.items():
        write("openai_chunk", name, body)


def eventstream_message(headers, payload):
    encoded = b""
    for name, value in headers:
        encoded += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def event(kind, body):
    return eventstream_message(
        [(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
        json.dumps(body).encode())


def bedrock_seeds():
    reply = (event("messageStart", {"role": "assistant"})
             + event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hello"}})
             + event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " there\n😀"}})
             + event("contentBlockStop", {"contentBlockIndex": 0})
             + event("messageStop", {"stopReason": "end_turn"})
             + event("metadata", {"usage": {"inputTokens": 5, "outputTokens": 3, "totalTokens": 8},
                                  "metrics": {"latencyMs": 10}}))
    write("bedrock_stream", "reply", b"\x00" + reply)
    exception = eventstream_message(
        [(":exception-type", "throttlingException"), (":content-type", "application/json"),
         (":message-type", "exception")],
        b'{"message": "Too many requests"}')
    write("bedrock_stream", "exception-mid-stream", b"\x00" + reply[:len(reply) // 2] + exception)
    write("bedrock_stream", "truncated", b"\x00" + reply[:37])
    write("bedrock_stream", "validation-400", b"\x02" + b'{"message": "Input is too long for requested model."}')
    write("bedrock_stream", "throttled-429", b"\x03" + b'{"message": "Rate exceeded"}')


def accounting_seeds():
    bodies = {
        "calculate": {"modelId": "default", "tokens": 120, "message": "hello"},
        "check": {"userId": "alice", "requiredCredits": 0.25, "modelId": "default"},
        "initialize": {"sessionId": "s-1", "modelId": "default", "estimatedTokens": 100,
                       "userId": "alice", "route": "default", "tokensGenerated": 3},
        "finalize": {"sessionId": "s-1", "actualTokens": 40, "success": True, "duration": 1200,
                     "userId": "alice", "modelId": "m", "inputTokens": 100, "usageEstimated": False},
        "abort": {"sessionId": "s-1", "tokensGenerated": 0, "reason": "client left", "error": None},
        "grant": {"userId": "alice", "credits": 1000000000},
        "settlement": {"sessionId": "s-1", "userId": "alice", "modelId": "m", "outcome": "completed",
                       "inputTokens": 1, "outputTokens": 2, "allocatedCredits": 2.048,
                       "chargedCredits": 0.000001, "replayed": False, "balance": 99.5, "held": 0,
                       "available": 99.5},
        "usage": {"userId": "alice", "page": 1, "limit": 50, "records": [
            {"requestId": "r", "sessionId": "s", "route": "default", "modelId": "m", "inputTokens": 1,
             "outputTokens": 1, "held": 1, "charged": 0.5, "overage": 0, "outcome": "completed",
             "estimated": False, "startedAt": "2026-01-01T00:00:00Z", "settledAt": "2026-01-01T00:00:01Z"}]},
        "error": {"code": "INSUFFICIENT_CREDITS", "message": "no", "balance": 0, "available": 0,
                  "requiredCredits": 2.051},
        "old-bad-check": {"credits": 2},
    }
    for name, body in bodies.items():
        write("accounting_bodies", name, json.dumps(body))


# libFuzzer dictionaries: the words of each format, which random mutation
# rarely spells out by itself.
DICTIONARIES = {
    "routes_file": ["defaultRoute:", "routes:", "- alias:", "targets:", "provider:", "bedrock", "openai",
                    "simulated", "model:", "pricing:", "inputPer1k:", "outputPer1k:", "maxOutputTokens:",
                    "timeoutSeconds:", "allowedRoles:", "fallbackOn:", "limits:", "requestsPerMinute:",
                    "concurrentStreams:", "downgradeWhenUnaffordable:", "throttled", "unavailable", "timeout",
                    "user", "supervisor", "admin", "0.000001", "1000000", "&anchor", "*anchor", "!!str", "---"],
    "jwt": ["Bearer ", "bearer ", '"alg"', '"HS256"', '"RS256"', '"ES256"', '"none"', '"kid"', '"typ"', '"JWT"',
            '"sub"', '"role"', '"admin"', '"cohorts"', '"exp"', '"nbf"', '"iss"', '"aud"', "eyJ", "."],
    "sse_frames": ["\n", "\r\n", "\r", "data:", "event:", "id:", ":", "\u2028", "\ufeff"],
    "openai_stream": ["data: ", "[DONE]", '"choices"', '"delta"', '"content"', '"role"', '"finish_reason"',
                      '"stop"', '"length"', '"content_filter"', '"usage"', '"prompt_tokens"',
                      '"completion_tokens"', '"error"', '"message"', '"code"', '"type"', '"rate_limit_exceeded"',
                      '"context_length_exceeded"', "null", '""', "\n\n", "\r\n", ": ping"],
    "openai_chunk": ['"choices"', '"delta"', '"content"', '"finish_reason"', '"usage"', '"error"', '"index"',
                     "null", "true", "false", '""', "\\u00e9", "\\n", "\\\"", "[]", "{}", "-0", "1e3"],
    "bedrock_stream": [":event-type", ":message-type", ":exception-type", ":content-type", "event", "exception",
                       "messageStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata",
                       "throttlingException", "validationException", "modelStreamErrorException",
                       '"stopReason"', '"end_turn"', '"max_tokens"', '"delta"', '"text"', '"usage"',
                       '"inputTokens"', '"outputTokens"', "application/json"],
    "accounting_bodies": ['"modelId"', '"tokens"', '"message"', '"userId"', '"requiredCredits"', '"sessionId"',
                          '"estimatedTokens"', '"route"', '"tokensGenerated"', '"actualTokens"', '"success"',
                          '"duration"', '"inputTokens"', '"usageEstimated"', '"reason"', '"error"', '"credits"',
                          '"outcome"', '"completed"', '"balance"', '"held"', '"available"', '"replayed"',
                          "0.000001", "1e21", "-0", "null", "true", "9007199254740993"],
}


def dictionary_entry(word):
    """A libFuzzer dictionary line: printable ASCII as is, other bytes as \\xNN."""
    escaped = ""
    for byte in word.encode():
        char = chr(byte)
        if char in '\\"' or not 0x20 <= byte < 0x7F:
            escaped += f"\\x{byte:02x}"
        else:
            escaped += char
    return f'"{escaped}"'


def write_dictionaries():
    directory = CORPUS.parent / "dict"
    directory.mkdir(exist_ok=True)
    for target, words in DICTIONARIES.items():
        lines = [dictionary_entry(word) for word in words]
        (directory / f"{target}.dict").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_dictionaries()
    routes_seeds()
    jwt_seeds()
    sse_seeds()
    openai_seeds()
    bedrock_seeds()
    accounting_seeds()
