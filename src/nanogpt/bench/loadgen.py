"""A load generator for `nanogpt serve` that speaks only HTTP: the server as a subprocess, streaming clients,
and the statistics of what came back (time to first token, inter-token latencies, tokens/s).

The server is started as `python -m nanogpt serve --model DIR --port 0 ...` (never imported: the bench and
the server are sibling layers), its port read from its "on http://HOST:PORT/v1" line, and it is always
stopped (SIGTERM, then SIGKILL after a timeout), also when the run fails. Clients are threads with their own
HTTP/1.1 connection (stdlib `http.client`), each sending its share of the requests one after another.
Every request streams `/v1/completions` with a token-id prompt, `temperature: 0`, `logprobs: 0` and
`return_tokens_as_token_ids: true`, so each chunk lists the exact tokens it carries; a server that sends
chunks without `logprobs` is counted one token per non-empty text chunk and the result says so.

    with ServerProcess(ckpt, threads=2, log=Path("serve.log")) as server:
        results, wall, cpu = run_level(server, plan_requests(8, (16, 256), (64, 256), 50257, seed=0), 4)
    summarize_level(results, wall)
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogpt.data.tokenizer import EOT_ID
from nanogpt.errors import UserError

# flags the bench sets itself: passing them in --serve-args would fight it
OWN_FLAGS = ("--model", "--port", "--threads", "--device", "--api-key-env")
LISTEN_LINE = re.compile(r"on http://(\[[^\]]+\]|[^\s:/]+):(\d+)/v1")

# --- the statistics (pure) ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def inter_token_latencies(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive token-carrying chunks (seconds). A chunk that carries several tokens is one
    gap, not several (as vLLM's benchmark_serving counts): a server that batches tokens into chunks shows
    longer, fewer gaps."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


def tokens_in_chunk(choice: dict[str, Any]) -> tuple[int, bool]:
    """(tokens a streamed completion choice carries, whether counted exactly from `logprobs.tokens`).

    Without logprobs a non-empty text counts as one token: a guess, since a token may be half a character
    (an empty text) and a server may send several tokens in one chunk.
    """
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list):
        return len(lp["tokens"]), True
    return (1 if choice.get("text") else 0), False


@dataclass
class RequestResult:
    """One streamed request: when it was sent, when each token-carrying chunk arrived, how it ended."""

    client: int
    prompt_tokens: int
    max_tokens: int
    start: float  # time.perf_counter() just before the request was sent
    end: float = 0.0  # when the stream ended ([DONE], an error, or a broken connection)
    chunk_times: list[float] = field(default_factory=list)  # perf_counter() of each token-carrying chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    finish_reason: str | None = None
    error: str | None = None
    exact: bool = True  # every chunk's tokens counted from logprobs.tokens

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        return inter_token_latencies(self.chunk_times)

    def summary(self) -> dict[str, Any]:
        itl = self.itls
        return {
            "client": self.client,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "tokens": self.tokens,
            "chunks": len(self.chunk_times),
            "ttft_s": self.ttft,
            "latency_s": self.end - self.start,
            "itl_p50_s": percentile(itl, 50),
            "itl_max_s": max(itl) if itl else None,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "exact_count": self.exact,
        }


def summarize_level(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    """One concurrency level: tokens/s over the level's wall time, and TTFT, ITL and latency percentiles
    pooled over every request (failed ones count their tokens but give no latency)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in results)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.itls]
    latency = [r.end - r.start for r in ok]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "tokens": tokens,
        "tokens_asked": sum(r.max_tokens for r in results),
        "finish_reasons": dict(Counter(r.finish_reason or "none" for r in results)),
        "exact_token_counts": all(r.exact for r in results),
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
    }


# --- the requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPlan:
    prompt: list[int]
    max_tokens: int


def plan_requests(
    n: int, prompt_range: tuple[int, int], new_range: tuple[int, int], vocab_size: int, seed: int
) -> list[RequestPlan]:
    """`n` requests from a seeded stream: prompt lengths and max_tokens drawn uniformly from the inclusive
    ranges, prompt ids uniform below EOT (a prompt never holds the end-of-text token)."""
    rng = random.Random(seed)
    top = min(vocab_size, EOT_ID)
    plans = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        plans.append(RequestPlan([rng.randrange(top) for _ in range(length)], rng.randint(*new_range)))
    return plans


def request_body(plan: RequestPlan, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": plan.prompt,
        "max_tokens": plan.max_tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {sample name with its labels, as written: value}; comments and lines that
    are not `NAME VALUE` are skipped (the bench reads only counters it knows)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if not name or line.startswith("#"):
            continue
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def stream_completion(
    host: str, port: int, plan: RequestPlan, model: str, client: int = 0, timeout: float = 600
) -> RequestResult:
    """Send one streaming completion and time its chunks; any failure is recorded, never raised."""
    body = json.dumps(request_body(plan, model)).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    res = RequestResult(client, len(plan.prompt), plan.max_tokens, start=time.perf_counter())
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}"
            return res
        done = False
        for raw in resp:  # SSE: "data: {...}" lines; http.client undoes the chunked encoding
            now = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                res.error = f"in stream: {err.get('message', err) if isinstance(err, dict) else err}"
                continue
            if not event.get("choices"):  # e.g. a final usage-only chunk
                continue
            choice = event["choices"][0]
            n, exact = tokens_in_chunk(choice)
            res.exact &= exact or n == 0
            if n:
                res.chunk_times.append(now)
                res.chunk_tokens.append(n)
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
        if not done and res.error is None:
            res.error = "the stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.perf_counter()
        conn.close()
    return res


def run_level(
    server: ServerProcess, plans: Sequence[RequestPlan], concurrency: int, timeout: float = 600
) -> tuple[list[RequestResult], float, float]:
    """`concurrency` client threads, client i sending plans[i::concurrency] one after another, all released
    at once. Returns the results, the wall time (release to the last stream's end) and this process's CPU
    seconds meanwhile (the clients' own cost, which competes with the server on a small machine)."""
    results: list[list[RequestResult]] = [[] for _ in range(concurrency)]
    go = threading.Event()

    def client(i: int) -> None:
        go.wait()
        for plan in plans[i::concurrency]:
            results[i].append(stream_completion(server.host, server.port, plan, server.name, i, timeout))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    flat = [r for rs in results for r in rs]
    wall = max((r.end for r in flat), default=t0) - t0
    return flat, wall, time.process_time() - cpu0


# --- the server subprocess ----------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM if the bench dies without its cleanup (SIGKILL, a crash)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _get_json(host: str, port: int, path: str, timeout: float = 5) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"GET {path}: HTTP {resp.status}")
        return json.loads(body)
    finally:
        conn.close()


class ServerProcess:
    """`python -m nanogpt serve` on a free port, as a context manager: started and healthy on entry,
    stopped on exit (SIGTERM, then SIGKILL after `stop_timeout` s), whatever happened in between.

    Its stdout and stderr (one line per request) go to `log`, a file, so a full pipe can never stall it.
    """

    def __init__(
        self,
        model: str | Path,
        threads: int,
        log: Path,
        serve_args: Sequence[str] = (),
        device: str | None = None,
        start_timeout: float = 300,
        stop_timeout: float = 15,
    ) -> None:
        self.cmd = [sys.executable, "-m", "nanogpt", "serve", "--model", str(model), "--port", "0"]
        self.cmd += ["--threads", str(threads)] + (["--device", device] if device else []) + list(serve_args)
        self.log, self.start_timeout, self.stop_timeout = log, start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.host, self.port, self.name, self.line = "127.0.0.1", 0, "", ""
        self.max_model_len: int | None = None
        self.stopped_by: str | None = None  # None: it exited on its own (or never started)

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def start(self) -> None:
        import nanogpt

        src = str(Path(nanogpt.__file__).resolve().parents[1])  # the child imports this very nanogpt
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        with open(self.log, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.port:
            m = LISTEN_LINE.search(self.log.read_text(errors="replace"))
            if m:
                self.line = next(x for x in self.log.read_text().splitlines() if LISTEN_LINE.search(x))
                host = m.group(1).strip("[]")
                self.host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
                self.port = int(m.group(2))
            else:
                self._check_alive(deadline, "print its address")
        while True:
            try:
                _get_json(self.host, self.port, "/health")
                break
            except (OSError, ValueError, http.client.HTTPException):
                self._check_alive(deadline, "answer /health")
        card = _get_json(self.host, self.port, "/v1/models")["data"][0]
        self.name, self.max_model_len = card["id"], card.get("max_model_len")

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise UserError(
                f"`{' '.join(self.cmd[2:])}` exited with code {self.proc.returncode} before it could {what}: "
                f"{self.log_tail()}; check --serve-args"
            )
        if time.monotonic() > deadline:
            raise UserError(f"the server did not {what} within {self.start_timeout:.0f} s: {self.log_tail()}")
        time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self) -> float | None:
        """The server's user + system CPU seconds so far (Linux /proc; None elsewhere or once gone)."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        """The server's `GET /metrics` now, as {sample name with its labels: value} ({} if unreadable)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace") if resp.status == 200 else ""
        except (OSError, http.client.HTTPException):
            return {}
        finally:
            conn.close()
        return parse_metrics(text)

    def stop(self) -> int | None:
        """SIGTERM, wait up to `stop_timeout` s, then SIGKILL; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down, then re-raises it: exit code -15
            self.stopped_by = "SIGTERM"
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.stopped_by = f"SIGKILL ({self.stop_timeout:.0f} s after SIGTERM)"
        return self.proc.returncode


def parse_serve_args(text: str) -> list[str]:
    """`--serve-args "..."` split as a shell would; the flags the bench sets itself are refused."""
    import shlex

    try:
        args = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--serve-args {text!r} cannot be split ({e}); check its quotes") from None
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise UserError(
                f"--serve-args sets {flag}, which the bench sets itself "
                "(--model/--preset, a free port, --threads and --device are the bench's own flags; "
                "an API key is not supported); drop it"
            )
    return args
