"""Remote teachers behind OpenAI-compatible APIs, with retries and an on-disk answer cache.

Two kinds, because what an API returns decides what can be distilled:

- token level (`TopKDistillLoss`): a /v1/completions server for a model with *our* GPT-2 tokenizer that
  scores a prompt (`echo=true, max_tokens=0, logprobs=k`) and returns the top-k alternatives at every
  prompt position: `nanogpt serve`, vLLM or llama.cpp serving GPT-2. Each training window is sent as a
  token-id prompt; the returned tokens ("token_id:N" or token strings) are mapped back to our ids, and a
  string that is not exactly one of our tokens means the teacher uses another tokenizer: refused. The
  soft loss is `losses.sparse_kl` (top-k + a rest-of-mass bucket).
- sequence level (`build_chat_data` + `MixedDataLoss`): any /v1/chat/completions endpoint, any tokenizer
  (the card's GPT-OSS-20B on Groq returns no logprobs). The teacher continues prompts drawn from the
  training split; prompts, replies and the model name are stored in `replies.jsonl`, the texts become a
  token shard, and the student learns them with the hard loss, mixed with the original data (the prompts,
  the data folder and the loss are `nanogpt.distill.sequence`, shared with a local teacher that writes text).

The HTTP side (retries, the answer cache, redirects, key redaction) is `nanogpt.distill.client`; an
answer is cached only once it parsed here (top-k targets, a chat reply), so garbage is asked again.
Failures (unreachable API, HTTP errors, garbage JSON, no logprobs, another tokenizer) raise `TeacherError`,
a one-line `UserError`, or are counted and skipped with `skip_bad`.

    client = ApiClient(ApiConfig("http://127.0.0.1:8000/v1", "gpt2"), AnswerCache("cache.sqlite"))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanogpt.data.tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer, get_tokenizer
from nanogpt.distill.client import (  # noqa: F401  (the client's names are part of this module's API)
    AnswerCache,
    ApiClient,
    ApiConfig,
    TeacherDown,
    TeacherError,
    redact,
    retry_after_seconds,
)
from nanogpt.distill.losses import LossParts, sparse_kl
from nanogpt.distill.sequence import (  # noqa: F401  (sequence-level names this module has always offered)
    CHAT_INSTRUCTION,
    MixedDataLoss,
    build_sequence_data,
    draw_prompts,
)
from nanogpt.errors import SettingError
from nanogpt.train.losses import LossLog

OTHER_TOKENIZER = "teacher uses another tokenizer"


# --- token level: top-k logprobs of a prompt --------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """A window's teacher targets: for each position t, the top-k next tokens (T, k) and log-probs."""

    ids: torch.Tensor  # (T, k) int64, padding 0 where valid is False
    logprobs: torch.Tensor  # (T, k) float32
    valid: torch.Tensor  # (T, k) bool


def token_id_of(s: str, tok: Tokenizer) -> int | None:
    """Our id of a returned token: "token_id:N", or a string that is exactly one GPT-2 token.

    None for a string that cannot be mapped faithfully (a partial UTF-8 byte shown as U+FFFD); raises
    TeacherError when the string is not one of our tokens (the teacher uses another tokenizer).
    """
    if s.startswith("token_id:"):
        try:
            i = int(s[len("token_id:") :])
        except ValueError:
            i = -1
        if not 0 <= i < VOCAB_SIZE:
            raise TeacherError(
                f"teacher returned a malformed token {s[:40]!r} (not token_id:N with N < {VOCAB_SIZE}); "
                "it must serve GPT-2's tokenizer, else use a chat: teacher"
            )
        return i
    if "\ufffd" in s:
        return None
    ids = tok.encode(s) if s != "<|endoftext|>" else [EOT_ID]
    if len(ids) != 1 or tok.decode(ids) != s:
        raise TeacherError(
            f"{OTHER_TOKENIZER}: its token {s!r} is not one GPT-2 token; use a chat: teacher instead"
        )
    return ids[0]


def parse_topk(answer: dict[str, Any], window: Sequence[int], k: int, tok: Tokenizer) -> TopK:
    """Targets for positions 0..len(window)-2 from a completions answer scoring `window` (echo, max_tokens=0).

    `top_logprobs[i]` holds the alternatives for prompt token i given tokens < i (None for i = 0), so the
    student's position t (predicting window[t+1]) takes entry t+1.
    """
    try:
        lp = answer["choices"][0]["logprobs"]
        tokens, tops = lp["tokens"], lp["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise TeacherError(
            "teacher reply has no prompt logprobs; it must support echo=true, max_tokens=0, logprobs=k"
        ) from None
    n = len(window)
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) < n or len(tops) < n:
        got = len(tokens) if isinstance(tokens, list) else type(tokens).__name__
        raise TeacherError(f"{OTHER_TOKENIZER} or ignored the prompt: it echoed {got} tokens for {n}")
    for i in range(n):  # the echo must be our prompt, token for token
        echoed = token_id_of(str(tokens[i]), tok)
        if echoed is not None and echoed != window[i]:
            raise TeacherError(f"{OTHER_TOKENIZER}: prompt token {i} came back as {str(tokens[i])[:40]!r}")
    ids = torch.zeros(n - 1, k, dtype=torch.long)
    lps = torch.zeros(n - 1, k)
    valid = torch.zeros(n - 1, k, dtype=torch.bool)
    for t in range(n - 1):
        entry = tops[t + 1]
        if not isinstance(entry, dict) or not entry:
            raise TeacherError(
                f"teacher reply lacks top logprobs at prompt position {t + 1}; it must support echo=true, "
                "max_tokens=0, logprobs=k"
            )
        for s, logprob in entry.items():
            # a bool is an int to Python; NaN and +inf are no probability; -inf is p = 0
            if isinstance(logprob, bool) or not isinstance(logprob, int | float) or not logprob < math.inf:
                raise TeacherError(
                    f"teacher gave the logprob {str(logprob)[:40]!r} for {str(s)[:40]!r} at prompt position "
                    f"{t + 1}, not a number; check that `teacher` is an OpenAI-compatible completions API"
                )
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        for j, (s, logprob) in enumerate(best):
            token = token_id_of(str(s), tok)
            if token is None or logprob > 0.0:
                continue  # unmappable or nonsense: its mass falls into the rest bucket
            ids[t, j], lps[t, j], valid[t, j] = token, float(logprob), True
    return TopK(ids, lps, valid)


class TopKDistillLoss:
    """The trainer's loss_fn for a token-level API teacher: alpha*CE + (1-alpha)*sparse top-k KL."""

    def __init__(
        self,
        client: ApiClient,
        k: int = 20,
        alpha: float = 0.5,
        T: float = 1.0,
        *,
        skip_bad: bool = False,
        log: LossLog | None = None,
    ) -> None:
        if not 1 <= k <= VOCAB_SIZE:
            raise SettingError(
                "top_k", f"`top_k` {k} is out of range: give an integer in [1, {VOCAB_SIZE}], e.g. `top_k` 20"
            )
        self.client, self.k, self.alpha, self.T, self.skip_bad = client, k, alpha, T, skip_bad
        self.log = log if log is not None else LossLog()
        self.tok = get_tokenizer()

    @property
    def skipped(self) -> int:
        return self.client.skipped

    def request(self, window: list[int]) -> dict[str, Any]:
        return {
            "model": self.client.cfg.model,
            "prompt": window,
            "max_tokens": 0,
            "echo": True,
            "logprobs": self.k,
            "temperature": 1.0,
            "return_tokens_as_token_ids": True,  # vLLM's and nanogpt serve's exact-id extension
        }

    def teacher_topk(self, windows: list[list[int]]) -> list[TopK | None]:
        def one(w: list[int]) -> TopK:
            return self.client.post(
                "/completions", self.request(w), lambda a: parse_topk(a, w, self.k, self.tok)
            )

        return self.client.map(one, windows, skip_bad=self.skip_bad)

    def teacher_tensors(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's answer for a batch, on the CPU: top-k ids, log-probs and valid flags (B, T, k) and
        the rows it answered (B, T) (a skipped answer's row is all False). Both backends' losses use it."""
        windows = torch.cat([x, y[:, -1:]], dim=1).tolist()  # the whole (T+1)-token window per row
        answers = self.teacher_topk(windows)
        B, T = x.shape
        ids = torch.zeros(B, T, self.k, dtype=torch.long)
        lps, valid = torch.zeros(B, T, self.k), torch.zeros(B, T, self.k, dtype=torch.bool)
        rows = torch.zeros(B, T, dtype=torch.bool)
        for b, a in enumerate(answers):
            if a is not None:
                ids[b], lps[b], valid[b], rows[b] = a.ids, a.logprobs, a.valid, True
        return ids, lps, valid, rows

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()  # (B, T, V)
        ids, lps, valid, rows = (t.to(logits.device) for t in self.teacher_tensors(x, y))
        hard = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        soft = sparse_kl(logits, ids, lps, self.T, valid, rows)
        parts = LossParts(self.alpha * hard + (1 - self.alpha) * soft, hard, soft)
        self.log.record(parts.hard, parts.soft, skipped=self.client.skipped)
        return parts.total


# --- sequence level: a chat teacher writes text -------------------------------------------------------------


def chat_reply(answer: dict[str, Any]) -> str:
    """The text of a chat completion; TeacherError (nothing cached) when there is none."""
    try:
        reply = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise TeacherError(
            "chat teacher reply has no choices[0].message.content; check the model name and that `teacher` "
            "is an OpenAI-compatible chat API"
        ) from None
    if not isinstance(reply, str) or not reply.strip():
        raise TeacherError(
            "chat teacher gave an empty reply (a reasoning model out of max_tokens?); raise `reply_tokens`",
            setting="reply_tokens",
        )
    return reply


def build_chat_data(
    client: ApiClient,
    data_dir: str | Path,
    out: str | Path,
    *,
    n_prompts: int = 256,
    prompt_tokens: int = 64,
    reply_tokens: int = 256,
    seed: int = 1337,
    skip_bad: bool = False,
) -> Path:
    """Ask the chat teacher to continue corpus prompts; write replies.jsonl and a one-split data folder.

    Each answer is cached as it arrives; calling again (a resumed run) re-reads the cache for free.
    """

    def answer(requests: list[dict[str, Any]]) -> list[str | None]:
        def ask(body: dict[str, Any]) -> str:
            return client.post("/chat/completions", body, chat_reply)

        return client.map(ask, requests, skip_bad=skip_bad)

    return build_sequence_data(
        data_dir,
        out,
        answer,
        model=client.cfg.model,
        source={"kind": "chat-teacher", "base_url": client.cfg.base_url},
        n_prompts=n_prompts,
        prompt_tokens=prompt_tokens,
        reply_tokens=reply_tokens,
        seed=seed,
    )
