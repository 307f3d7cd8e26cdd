"""Talking to a server on 127.0.0.1 from a test: a free port, one JSON POST."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
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
