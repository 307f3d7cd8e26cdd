"""Talking to a server on 127.0.0.1 from a test: a free port, one JSON POST, a `nanogpt serve` subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply(NamedTuple):
    status: int
    body: Any  # the decoded JSON answer


def post(
    url: str, body: object, headers: dict | None = None, raw: bytes | None = None, timeout: float = 60
) -> Reply:
    """POST `body` as JSON (or the bytes `raw` as they are): its status and decoded JSON answer, also when an error status."""
    data = raw if raw is not None else json.dumps(body).encode()  # NaN and Infinity as Python writes them
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return Reply(e.code, json.loads(e.read()))


KEY_ENV = "NANOGPT_TEST_SERVE_KEY"


class Server:
    """A `nanogpt serve` subprocess; its stderr (one line per request) goes to `log`."""

    def __init__(
        self,
        model: Path,
        log: Path,
        port: int | None = None,
        key: str | None = None,
        dtype: str = "fp32",
        extra: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        args = [
            sys.executable,
            "-m",
            "nanogpt.commands.serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
        ]
        args += ["--name", "tiny", "--threads", "1", "--dtype", dtype, *extra]
        if key:
            env[KEY_ENV] = key
            args += ["--api-key-env", KEY_ENV]
        with open(log, "a") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(args, stderr=err, stdout=subprocess.DEVNULL, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 60 s")

    def requests(self, path: str = "/v1/completions") -> int:
        return sum(f"POST {path} " in line for line in self.log.read_text().splitlines())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
