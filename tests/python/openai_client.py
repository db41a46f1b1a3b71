"""Parley's OpenAI-compatible API as the official `openai` Python client sees it.

Run by tests/tests/openai_client.rs against the real service binary:
    $PARLEY_TEST_PYTHON tests/python/openai_client.py CASE
with PARLEY_OPENAI_BASE_URL (the service's /v1) and PARLEY_OPENAI_KEY (a JWT
or an API key). Each case checks what the client itself shows (its types and
exceptions) and prints one JSON object for the Rust side to check against
the ledger and the upstream stand-in. Any failed check exits non-zero.
"""

import json
import os
import sys
import time

try:
    import openai
except ImportError:
    sys.exit(
        "the `openai` package is missing from this interpreter: run "
        "`scripts/test-env.sh install` and use the PARLEY_TEST_PYTHON it sets up"
    )


def client(max_retries=0):
    return openai.OpenAI(
        base_url=os.environ["PARLEY_OPENAI_BASE_URL"],
        api_key=os.environ["PARLEY_OPENAI_KEY"],
        max_retries=max_retries,
        timeout=60,
    )


def whole(model="sim", text="one two three"):
    completion = client().chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Echo the user."},
            {"role": "user", "content": text},
        ],
    )
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    return {
        "model": completion.model,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens,
    }


def streamed(model="sim", text="four five six seven"):
    stream = client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1, "one id per completion"
    *content_chunks, last = chunks
    assert last.choices == [] and last.usage is not None, "the usage chunk comes last"
    assert all(c.usage is None for c in content_chunks)
    assert content_chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert len(finish) == 1
    return {
        "model": last.model,
        "content": "".join(c.choices[0].delta.content or "" for c in content_chunks),
        "finish_reason": finish[0],
        "prompt_tokens": last.usage.prompt_tokens,
        "completion_tokens": last.usage.completion_tokens,
    }


def models():
    listed = client().models.list()
    assert all(isinstance(m, openai.types.Model) for m in listed.data)
    retrieved = client().models.retrieve("sim")
    assert retrieved.id == "sim"
    try:
        client().models.retrieve("gpt-nonexistent")
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("an unknown model was found")
    return {"models": sorted(m.id for m in listed.data)}


def fallback():
    return {"whole": whole(model="default", text="hello"),
            "streamed": streamed(model="default", text="hello")}


def insufficient():
    try:
        whole(model="dear")
    except openai.APIStatusError as error:
        # 402 has no subclass of its own: the client's base status error.
        assert type(error) is openai.APIStatusError, type(error)
        assert error.status_code == 402
        assert error.code == "insufficient_credits", error.code
        return {"exception": type(error).__name__, "message": error.message}
    raise AssertionError("a 402 was expected")


def unknown_model():
    try:
        whole(model="gpt-nonexistent")
    except (openai.NotFoundError, openai.BadRequestError) as error:
        assert error.code == "model_not_found", error.code
        assert error.param == "model"
        return {"exception": type(error).__name__}
    raise AssertionError("an unknown model was accepted")


def retried():
    """The first call is throttled (429, Retry-After: 1); the client's own
    retry succeeds after waiting what the server said."""
    started = time.monotonic()
    completion = client(max_retries=2).chat.completions.create(
        model="retried", messages=[{"role": "user", "content": "again"}]
    )
    waited = time.monotonic() - started
    # Its own backoff would have waited at most 0.5 s.
    assert waited >= 1.0, waited
    return {"content": completion.choices[0].message.content, "waited": waited}


def rate_limited():
    try:
        for _ in range(2):
            whole(model="rationed")
    except openai.RateLimitError as error:
        retry_after = int(error.response.headers["retry-after"])
        assert 1 <= retry_after <= 60, retry_after
        assert error.code == "rate_limit_exceeded"
        return {"exception": type(error).__name__, "retry_after": retry_after}
    raise AssertionError("the second request on a route of one a minute was accepted")


def refused():
    try:
        whole()
    except openai.AuthenticationError as error:
        assert error.status_code == 401
        return {"exception": type(error).__name__, "message": error.message}
    raise AssertionError("the key was accepted")


def leave():
    """Reads the first words of a reply that stalls, then closes the stream."""
    stream = client().chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "talk"}], stream=True
    )
    text = ""
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        if text:
            break
    stream.close()
    return {"content": text}


CASES = {
    "whole": whole,
    "streamed": streamed,
    "models": models,
    "fallback": fallback,
    "insufficient": insufficient,
    "unknown_model": unknown_model,
    "retried": retried,
    "rate_limited": rate_limited,
    "refused": refused,
    "leave": leave,
}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]]()))
