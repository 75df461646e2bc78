"""Run one function in a short child process, for work that needs a library the server must not keep.

CPython cannot unload a module: once `cryptography` is imported its Rust library stays mapped, 9-10 MB
of the server's RSS for the rest of its life (issue 19: idle RSS <= 60 MB). Making the first start's
self-signed certificate, checking a certificate before it goes live, or generating a DKIM key happens
once in a while; a child that imports what it needs, does the work and exits gives its memory back.
The cost is a fresh interpreter per call: about 0.1-0.2 s of CPU here (more on a Raspberry Pi).

The call and its answer travel as JSON on the child's stdin and stdout (key material never on its
command line). The child imports exactly what the server would: its sys.path is the server's.
An exception of a type the caller names in `expect` is raised again in the server with its message;
anything else becomes ChildFailed.

Blocking: from the event loop, call through asyncio.to_thread.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

TIMEOUT = 300.0  # a Raspberry Pi's first boot, its SD card cold: importing cryptography alone takes seconds
MAX_ANSWER = 1024 * 1024  # certificates and keys: far less


class ChildFailed(RuntimeError):
    """The child process did not give an answer (crashed, killed, timed out, an unexpected error)."""


def call(target: str, *args: Any, expect: tuple[type[Exception], ...] = ()) -> Any:
    """`module:function(*args)` in a child process; its JSON-able result. Arguments are JSON values."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    request = json.dumps({"target": target, "args": list(args)})
    try:
        done = subprocess.run([sys.executable, "-P", "-m", "appliance.child"], input=request.encode(),
                              capture_output=True, env=env, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ChildFailed(f"{target}: {exc}") from None
    try:
        answer = json.loads(done.stdout[:MAX_ANSWER])
    except ValueError:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ChildFailed(f"{target}: {tail[0]}") from None
    if "error" in answer:
        for kind in expect:
            if kind.__name__ == answer["error"]:
                raise kind(answer["message"])
        raise ChildFailed(f"{target}: {answer['error']}: {answer['message']}")
    return answer["result"]


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    module, _, name = str(request["target"]).partition(":")
    function = getattr(importlib.import_module(module), name)
    try:
        answer = {"result": function(*request["args"])}
    except Exception as exc:  # noqa: BLE001  reported to the server, which decides what it means
        answer = {"error": type(exc).__name__, "message": str(exc)}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
