"""One choice of an answer, from the engine's token events: its text (stop strings held back until they
cannot match), its log-probs, and the merged events of a request's jobs, cancelled when the client leaves.

Shared by every endpoint that generates (`app.py`: completions and chat; `responses.py`: the Responses API).

    async for i, ev in events(request, handles):
        text = choices[i].add(ev) if isinstance(ev, Token) else ""
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from typing import Any

from nanogpt.data.tokenizer import Tokenizer
from nanogpt.serve.engine import Event, Finished, Handle, PromptScores, Token
from nanogpt.serve.requests import CompletionRequest


def token_str(t: int, tok: Tokenizer, as_ids: bool) -> str:
    return f"token_id:{t}" if as_ids else tok.decode_bytes([t]).decode("utf-8", errors="replace")


class Choice:
    """The text of one choice as its tokens arrive: what may be sent now, and its logprob entries."""

    def __init__(self, index: int, req: CompletionRequest, tok: Tokenizer) -> None:
        self.index, self.req, self.tok = index, req, tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0  # all text decoded so far; how much of it was handed out
        self.hold = max((len(s) for s in req.sampling.stop), default=1) - 1  # may begin a stop string
        self.finish: str | None = None
        self.n_tokens = 0
        self.logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []  # this chunk's
        self.prompt_scores: PromptScores | None = None

    def add(self, ev: Token) -> str:
        """Take one token; return the text that can be sent now ("" while a character or a stop is pending)."""
        self.n_tokens += 1
        self.text += self.decoder.decode(self.tok.decode_bytes([ev.id]))
        stops = [
            i
            for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.req.sampling.stop)
            if i >= 0
        ]
        if stops:
            self.text, self.finish = self.text[: min(stops)], "stop"
            return self._take(len(self.text))
        if self.req.logprobs is not None:
            self.logprobs.append((ev.id, ev.logprob, ev.top))
        return self._take(len(self.text) - self.hold if self.req.sampling.stop else len(self.text))

    def end(self, reason: str) -> str:
        """The finish reason is known: the held-back text goes out (unless a stop string ended it)."""
        if self.finish is None:
            self.text += self.decoder.decode(b"", final=True)
            self.finish = reason
        return self._take(len(self.text))

    def prompt_text(self) -> str:
        return self.tok.decode(self.req.prompts[self.index // self.req.n])

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent : max(self.sent, upto)]
        self.sent += len(piece)
        return piece

    def logprob_fields(self, include_prompt: bool) -> Any:
        """This choice's logprobs so far, in the endpoint's format; the entries are handed out once."""
        entries, self.logprobs = self.logprobs, []
        as_ids = self.req.token_ids
        if self.req.chat:
            return {"content": [self._chat_entry(t, lp, top) for t, lp, top in entries]}
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        if include_prompt and self.prompt_scores is not None:
            ids = self.req.prompts[self.index // self.req.n]
            out["tokens"] += [token_str(t, self.tok, as_ids) for t in ids]
            out["token_logprobs"] += self.prompt_scores.logprobs
            out["top_logprobs"] += [None if t is None else self._top(t) for t in self.prompt_scores.top]
        for t, lp, top in entries:
            out["tokens"].append(token_str(t, self.tok, as_ids))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(self._top(top or []))
        return out

    def _top(self, top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, lp in top:
            out.setdefault(token_str(t, self.tok, self.req.token_ids), lp)  # partial bytes may print alike
        return out

    def _chat_entry(self, t: int, lp: float | None, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        def one(t: int, lp: float | None) -> dict[str, Any]:
            raw = self.tok.decode_bytes([t])
            return {"token": token_str(t, self.tok, self.req.token_ids), "logprob": lp, "bytes": list(raw)}

        return {**one(t, lp), "top_logprobs": [one(a, v) for a, v in top or []]}


async def events(request: Any, handles: list[Handle]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from every handle as they come; a client that leaves cancels them all."""
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        async for ev in h:
            await merged.put((i, ev))

    async def watch() -> None:  # the ASGI receive channel says "http.disconnect" when the client leaves
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.cancel()

    pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    watcher = asyncio.ensure_future(watch())
    try:
        unfinished = len(handles)
        while unfinished:
            i, ev = await merged.get()
            yield i, ev
            unfinished -= isinstance(ev, Finished)
    finally:
        for h in handles:
            h.cancel()  # a no-op for finished jobs; stops the rest when the answer was abandoned
        watcher.cancel()
        for p in pumps:
            p.cancel()


def failure(failed: list[Finished]) -> tuple[int, str] | None:
    """The error of a request whose job ended without an answer (timeout, shutdown, engine error)."""
    for f in failed:
        if f.reason == "timeout":
            return 408, "the request took longer than this server's --request-timeout"
        if f.reason == "cancelled":
            return 503, f.message or "the request was cancelled"
        if f.reason == "error":
            return 500, f"internal error: {f.message}"
    return None
