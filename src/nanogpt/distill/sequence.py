"""Sequence-level distillation, shared by every teacher that writes text (a `chat:` API, a local model of any
vocabulary): corpus prompts, the request a teacher answers, the teacher's text as a one-split data folder,
and the loss that mixes that text with the original data.

A teacher is a function from requests (OpenAI chat bodies, also for a local model: the same body is the
answer cache's key whoever answers it) to reply texts; `build_sequence_data` asks it once per prompt and
writes `replies.jsonl` plus a token shard. Answers are cached by the caller as they arrive, so a resumed
run asks again only what it never got.

    out = build_sequence_data(data_dir, out, answer, model="gpt-oss-20b", source={"kind": "chat-teacher"})
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.distill.client import TeacherError
from nanogpt.distill.losses import LossParts
from nanogpt.errors import SettingError
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.ops import linear_cross_entropy
from nanogpt.train.checkpoint import unwrap
from nanogpt.train.losses import LossLog

CHAT_INSTRUCTION = "Continue the following text. Reply with the continuation only, no preamble.\n\n"
REPLY_TEMPERATURE = 0.7

# requests (one per prompt, in order) -> reply texts; None or "" for an answer to leave out
Answer = Callable[[list[dict[str, Any]]], list[str | None]]


def draw_prompts(shards: list[np.ndarray], n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """`n` prompts of up to `prompt_tokens` tokens from the corpus, each within one document."""
    rng = np.random.default_rng([seed, 7])
    usable = [s for s in shards if len(s) > prompt_tokens]
    if not usable:
        raise SettingError(
            "prompt_tokens", f"the training split is shorter than `prompt_tokens` {prompt_tokens}"
        )
    out: list[list[int]] = []
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        s = usable[int(rng.integers(len(usable)))]
        off = int(rng.integers(0, len(s) - prompt_tokens))
        ids = [int(t) for t in s[off : off + prompt_tokens]]
        if EOT_ID in ids:  # keep the part after the last document boundary
            ids = ids[len(ids) - ids[::-1].index(EOT_ID) :]
        if len(ids) >= max(4, prompt_tokens // 4):
            out.append(ids)
    return out


def reply_request(model: str, text: str, reply_tokens: int, seed: int) -> dict[str, Any]:
    """The chat body asking `model` to continue `text` (sampled at 0.7, seeded)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": CHAT_INSTRUCTION + text}],
        **SamplingParams(
            max_tokens=reply_tokens, temperature=REPLY_TEMPERATURE, top_k=None, seed=seed
        ).openai_fields(),
    }


def prompt_text(request: dict[str, Any]) -> str:
    """The corpus text of a `reply_request` (what a base model without a chat format continues)."""
    return request["messages"][-1]["content"].removeprefix(CHAT_INSTRUCTION)


def build_sequence_data(
    data_dir: str | Path,
    out: str | Path,
    answer: Answer,
    *,
    model: str,
    source: dict[str, Any],
    n_prompts: int = 256,
    prompt_tokens: int = 64,
    reply_tokens: int = 256,
    seed: int = 1337,
) -> Path:
    """Ask `answer` to continue corpus prompts; write replies.jsonl and a one-split data folder at `out`.

    Each reply becomes one document: its prompt's tokens, the reply re-tokenized with our GPT-2 BPE, EOT.
    `source` is recorded in meta.json (the teacher's kind, model, URL or path).
    """
    from nanogpt.data.shards import ShardWriter, TokenData, write_meta

    tok = get_tokenizer()
    prompts = draw_prompts(TokenData(data_dir).split("train"), n_prompts, prompt_tokens, seed)
    texts = [tok.decode(p) for p in prompts]
    replies = answer([reply_request(model, t, reply_tokens, seed + i) for i, t in enumerate(texts)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out / "train_00000.bin", vocab_size=tok.vocab_size)
    docs = empty = 0
    with open(out / "replies.jsonl", "w") as f:
        for i, reply in enumerate(replies):
            if reply is None:
                continue
            if not reply.strip():
                empty += 1
                continue
            f.write(json.dumps({"i": i, "model": model, "prompt": texts[i], "reply": reply}) + "\n")
            writer.write(prompts[i] + tok.encode(reply) + [EOT_ID])
            docs += 1
    writer.close()
    if empty:
        print(f"nanogpt distill: left out {empty} empty teacher replies", file=sys.stderr)
    if docs == 0:
        raise TeacherError(
            f"the teacher {model!r} gave no usable reply; check the model name and the teacher"
        )
    split = {"shards": ["train_00000.bin"], "tokens": writer.n_tokens, "documents": docs}
    write_meta(out, {"train": split}, {**source, "model": model})
    return out


class MixedDataLoss:
    """alpha * CE on the data batch + (1 - alpha) * CE on an equal batch of teacher-written text.

    The teacher batch is drawn with a seed hashed from the data batch, so it is a pure function of the
    trainer's (exactly resumed) sampler: a resumed run sees the same teacher windows.
    """

    def __init__(
        self, data_dir: str | Path, context_length: int, alpha: float = 0.5, log: LossLog | None = None
    ) -> None:
        from nanogpt.data.shards import TokenData

        self.shards = [s for s in TokenData(data_dir).split("train") if len(s) > context_length]
        if not self.shards:
            raise SettingError(
                "prompts",
                f"the teacher's text in {data_dir} is shorter than one window of {context_length + 1} tokens; "
                "ask for more `prompts` or `reply_tokens`",
            )
        self.context_length, self.alpha = context_length, alpha
        self.log = log if log is not None else LossLog()

    def teacher_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int.from_bytes(hashlib.sha256(x.cpu().numpy().tobytes()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(x.size(0)):
            s = self.shards[int(rng.integers(len(self.shards)))]
            off = int(rng.integers(0, len(s) - self.context_length))
            rows.append(np.asarray(s[off : off + self.context_length + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows)).to(x.device)
        return batch[:, :-1], batch[:, 1:]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xt, yt = self.teacher_batch(x)
        h = model(torch.cat([x, xt[:, : x.size(1)]]), hidden=True)  # one forward for both halves: (2B, T, d)
        head, B = unwrap(model).lm_head.weight, x.size(0)
        # the fused head per half, as plain training: no (2B, T, V) logits
        hard = linear_cross_entropy(h[:B].flatten(0, 1), head, y.flatten())
        soft = linear_cross_entropy(h[B:].flatten(0, 1), head, yt[:, : x.size(1)].flatten())
        parts = LossParts(self.alpha * hard + (1 - self.alpha) * soft, hard, soft)
        self.log.record(parts.hard, parts.soft)
        return parts.total
