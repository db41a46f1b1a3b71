"""Evaluates a Tiltfile without Tilt, for tests/tests/tiltfile.rs.

The Tiltfile runs in starlark-go, the Starlark implementation Tilt embeds,
with Tilt's dialect (top-level if/for, sets, recursion). Every Tilt function
it calls is a stand-in that records the call; the few whose result the
Tiltfile uses answer as Tilt would: `k8s_context` with the context given
here, `read_file` with the file, `helm` with a rendered chart given here,
`decode_yaml_stream` and `blob` as Tilt does. Prints one JSON object:

    {"calls": [{"function": ..., "args": [...], "kwargs": {...}}, ...],
     "error": null or the message that stopped the Tiltfile}

    python evaluate.py TILTFILE --context NAME --helm-render FILE
"""

import argparse
import json
import os
import sys

import starlark_go
import yaml

# Tilt functions the stand-ins answer; anything else the Tiltfile calls is
# an undefined name, and so an error in the output.
RECORDED_ONLY = [
    "allow_k8s_contexts",
    "docker_build",
    "custom_build",
    "k8s_kind",
    "k8s_resource",
    "k8s_yaml",
    "local",
    "local_resource",
    "watch_file",
    "warn",
]


class TiltfileFailed(Exception):
    """What Tilt's `fail()` raises."""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tiltfile")
    parser.add_argument("--context", required=True)
    parser.add_argument("--helm-render", required=True)
    options = parser.parse_args()
    tiltfile_dir = os.path.dirname(os.path.abspath(options.tiltfile))
    with open(options.helm_render, encoding="utf-8") as file:
        helm_render = file.read()

    calls = []

    def stand_in(name, answer=None):
        def call(*args, **kwargs):
            calls.append({"function": name, "args": list(args), "kwargs": kwargs})
            return answer(*args, **kwargs) if answer else None

        return call

    def read_file(path, default=None):
        try:
            with open(os.path.join(tiltfile_dir, path), encoding="utf-8") as file:
                return file.read()
        except FileNotFoundError:
            if default is None:
                raise
            return default

    def decode_yaml_stream(text):
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]

    def fail(message):
        raise TiltfileFailed(message)

    tilt = {name: stand_in(name) for name in RECORDED_ONLY}
    tilt.update(
        k8s_context=stand_in("k8s_context", lambda: options.context),
        read_file=stand_in("read_file", read_file),
        helm=stand_in("helm", lambda *args, **kwargs: helm_render),
        blob=stand_in("blob", lambda contents: contents),
        decode_yaml_stream=stand_in("decode_yaml_stream", decode_yaml_stream),
        fail=stand_in("fail", fail),
    )

    starlark_go.configure_starlark(allow_set=True, allow_global_reassign=True, allow_recursion=True)
    with open(options.tiltfile, encoding="utf-8") as file:
        source = file.read()
    error = None
    try:
        starlark_go.Starlark(globals=tilt).exec(source, filename="Tiltfile")
    except starlark_go.StarlarkError as stopped:
        error = str(stopped)
    json.dump({"calls": calls, "error": error}, sys.stdout)


if __name__ == "__main__":
    main()
