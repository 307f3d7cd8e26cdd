"""A real `nanogpt serve` process and real sockets: clients that leave, a crowd of them, and SIGTERM."""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.local_server import Server, post
from tests.tiny import tiny_config

LONG = 3000  # tokens a stream would run for if nobody stopped it (the context is 4096)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    model = NanoGPTLMHeadModel(tiny_config(context_length=4096))
    with torch.no_grad():  # <|endoftext|> is never the argmax: greedy streams run to max_tokens
        model.lm_head.weight[50256] = 0.0
        model.transformer.token_embedding.weight[50256] = 0.0
    return save_model(tmp_path_factory.mktemp("long") / "tiny", model)


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def wait_for(check, seconds: float = 30.0) -> bool:
    """Poll `check` until it is true; False after `seconds` (a bound on a hang, not a speed target)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def open_stream(url: str, max_tokens: int = LONG, seed: int = 0) -> tuple[socket.socket, Any]:
    """A raw streaming request; returns the socket and a reader of its SSE lines."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps(
        {"prompt": [1000 + seed, 2000, 3000], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    ).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock, sock.makefile("rb")


def data_lines(reader, n: int) -> list[bytes]:
    lines = []
    while len(lines) < n:
        line = reader.readline()
        assert line, "the server closed the stream early"
        if line.startswith(b"data: "):
            lines.append(line)
    return lines


def test_a_dropped_stream_frees_its_slot_and_the_next_request_is_served(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log", extra=["--max-batch", "1"])
    try:
        sock, reader = open_stream(server.url)
        data_lines(reader, 3)  # it is generating, in the only slot
        assert metric(server.url, "nanogpt_active_sequences") == 1
        reader.close()
        sock.close()  # the client goes away mid-stream (its file object held the socket open too)
        assert wait_for(lambda: metric(server.url, "nanogpt_active_sequences") == 0)
        # the slot is free: a new request gets all its tokens though the dropped one had LONG to go
        reply = post(server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "temperature": 0})
        assert reply.status == 200 and reply.body["usage"]["completion_tokens"] == 5
        assert metric(server.url, "nanogpt_generated_tokens_total") < LONG
        # the scheduler's profile: one row per decode step (--max-batch 1), each reading only its own keys
        steps = metric(server.url, "nanogpt_decode_steps_total")
        assert steps >= 2 + 4 and metric(server.url, "nanogpt_decode_rows_total") == steps
        read, needed = (
            metric(server.url, f'nanogpt_decode_keys_total{{kind="{k}"}}') for k in ("read", "needed")
        )
        assert read == needed > 0
        assert metric(server.url, 'nanogpt_engine_seconds_total{phase="decode"}') > 0
    finally:
        server.stop()


def test_an_abandoned_request_is_cancelled(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log", extra=["--max-batch", "1"])
    try:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"prompt": [5, 6, 7], "max_tokens": LONG, "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        assert wait_for(lambda: metric(server.url, "nanogpt_active_sequences") == 1)
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client gives up without reading the answer
        conn.close()
        assert wait_for(lambda: metric(server.url, "nanogpt_active_sequences") == 0)
        assert metric(server.url, "nanogpt_generated_tokens_total") < LONG
    finally:
        server.stop()


def test_many_clients_with_random_disconnects_leave_nothing_active(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log", extra=["--max-batch", "16", "--max-queue", "64"])
    rng = random.Random(0)
    plans = [(rng.randint(1, 40), rng.random() < 0.5, rng.randint(1, 6)) for _ in range(64)]
    outcomes: list[str] = []

    def client(i: int) -> None:
        max_tokens, drop, after = plans[i]
        sock, reader = open_stream(server.url, max_tokens=max_tokens, seed=i)
        try:
            if drop:
                for _ in range(after):
                    if not reader.readline():
                        break
                outcomes.append("dropped")
                return
            while (line := reader.readline()) and line.strip() != b"data: [DONE]":
                pass
            outcomes.append("done" if line else "cut")
        finally:
            reader.close()
            sock.close()

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(set(outcomes)) <= ["done", "dropped"] and len(outcomes) == 64
        assert wait_for(lambda: metric(server.url, "nanogpt_active_sequences") == 0)
        assert metric(server.url, "nanogpt_queue_depth") == 0
        reply = post(server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert reply.status == 200  # and it still serves
    finally:
        server.stop()


def test_sigterm_with_streams_in_flight_drains_and_exits_0(long_model, tmp_path):
    log = tmp_path / "serve.log"
    server = Server(long_model, log, extra=["--drain-seconds", "1"])
    short_sock, short = open_stream(server.url, max_tokens=20, seed=1)
    long_sock, long = open_stream(server.url, max_tokens=LONG, seed=2)
    data_lines(long, 2)
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(timeout=30) == 0
        short_rest = short.read().decode()
        long_rest = long.read().decode()
        assert '"finish_reason": "length"' in short_rest and "data: [DONE]" in short_rest  # it finished
        assert "the server shut down" in long_rest  # it was cancelled, and told so, at the drain's end
        lines = log.read_text().splitlines()
        assert lines[-1] == "nanogpt serve: stopped; requests cancelled at shutdown: 1"
    finally:
        for f in (short, long, short_sock, long_sock):
            f.close()
        if server.proc.poll() is None:
            server.stop()
