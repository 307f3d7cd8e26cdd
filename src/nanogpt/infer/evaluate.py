"""Held-out perplexity and bits per byte of a checkpoint, by the sliding-window method.

A fixed-context model cannot see a whole corpus at once, so it is scored window by window (the method of
Hugging Face's perplexity guide). A window feeds `context` tokens to the model and predicts the next
token at each position, exactly as training does (x = tokens[i:i+C], y = tokens[i+1:i+C+1]). Windows
start every `stride` tokens; each one scores only the targets the previous window did not, so every
token from position 1 on is scored exactly once. With stride = context the windows are independent
chunks (the training loss's view, fast); a smaller stride gives every scored token at least
`context - stride` tokens of history (a tighter, lower estimate on a trained model, slower).

Bits per byte divides the total NLL (in bits) by the UTF-8 bytes the scored tokens decode to, so it
compares models with different tokenizers; perplexity is per GPT-2 token.

    result = sliding_window_nll(load_model("runs/demo"), split_tokens("data/builtin", "val"), stride=256)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanogpt.config import ModelConfig
from nanogpt.data.shards import TokenData
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import UserError
from nanogpt.kernels.device import autocast, torch_dtype
from nanogpt.kernels.ops import linear_cross_entropy
from nanogpt.train.checkpoint import unwrap
from nanogpt.train.loop import perplexity


@dataclass(frozen=True)
class Window:
    """One model input: tokens[start : start + length]; its targets are tokens[start + 1 : start + length + 1].

    Only the last `scored` targets count: the earlier ones were scored by the previous window.
    """

    start: int
    length: int
    scored: int


@dataclass(frozen=True)
class EvalResult:
    tokens_scored: int
    mean_nll: float  # nats per token
    perplexity: float  # exp(mean_nll)
    bits_per_byte: float  # total NLL in bits / UTF-8 bytes of the scored tokens
    n_bytes: int
    context: int
    stride: int
    seconds: float  # scoring only (not loading)
    tokens_per_s: float


def iter_windows(n_tokens: int, context: int, stride: int) -> Iterator[Window]:
    """The windows that score targets 1 .. n_tokens - 1 exactly once (needs 1 <= stride <= context)."""
    if not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride={stride}, context={context}")
    last = 0  # index of the last target scored so far (token 0 is never a target)
    start = 0
    while last < n_tokens - 1:
        end = min(start + context, n_tokens - 1)  # inputs [start, end), last target index `end`
        # start <= last always holds (stride <= context), so scored <= length
        yield Window(start, end - start, end - last)
        last = end
        start += stride


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total NLL in nats -> bits, per UTF-8 byte of the scored text."""
    return total_nll / math.log(2) / n_bytes


def count_bytes(tokens: torch.Tensor | np.ndarray | list[int]) -> int:
    """UTF-8 bytes that the token ids decode to (special tokens count as their text, e.g. 13 for EOT)."""
    ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    return len(get_tokenizer().decode_bytes(ids))


def _batch(tokens: torch.Tensor, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, L) right-padded with token 0, targets (B, L) and a (B, L) mask of the scored targets.

    Right padding is harmless: causal attention keeps later (pad) positions out of earlier ones.
    """
    L = max(w.length for w in windows)
    x = torch.zeros(len(windows), L, dtype=torch.long)
    y = torch.zeros(len(windows), L, dtype=torch.long)
    mask = torch.zeros(len(windows), L, dtype=torch.bool)
    for i, w in enumerate(windows):
        x[i, : w.length] = tokens[w.start : w.start + w.length]
        y[i, : w.length] = tokens[w.start + 1 : w.start + w.length + 1]
        mask[i, w.length - w.scored : w.length] = True
    return x, y, mask


ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


def score_windows(
    tokens: torch.Tensor,
    score: ScoreFn,
    *,
    context: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> EvalResult:
    """The sliding-window method for any backend: `score(x, y, mask)` returns the summed NLL (nats) of the
    masked targets of one batch of windows ((B, L) int64 tensors on the CPU, mask bool)."""
    windows = list(iter_windows(len(tokens), context, stride))
    total_nll = 0.0  # accumulated in Python float64
    t0 = time.perf_counter()
    # disable=None: a bar only when asked for and stderr is a terminal
    bar = tqdm(total=len(tokens) - 1, unit="tok", disable=True if not progress else None, leave=False)
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            total_nll += score(*_batch(tokens, chunk))
            bar.update(sum(w.scored for w in chunk))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    n = len(tokens) - 1
    n_bytes = count_bytes(tokens[1:])
    mean = total_nll / n
    return EvalResult(
        tokens_scored=n,
        mean_nll=mean,
        perplexity=perplexity(mean),
        bits_per_byte=bits_per_byte(total_nll, n_bytes),
        n_bytes=n_bytes,
        context=context,
        stride=stride,
        seconds=seconds,
        tokens_per_s=n / seconds if seconds > 0 else float("inf"),
    )


def check_tokens(
    tokens: torch.Tensor | np.ndarray, cfg: ModelConfig, context: int, stride: int, batch_size: int
) -> torch.Tensor:
    """Flatten `tokens` to a CPU int64 tensor and refuse settings or ids the model cannot score."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten().cpu()
    check_settings(len(tokens), context, stride, batch_size, cfg.context_length)
    if int(tokens.max()) >= cfg.vocab_size or int(tokens.min()) < 0:
        raise UserError(
            f"token id {int(tokens.max())} is outside the model's vocabulary ({cfg.vocab_size}); "
            "evaluate data made with the model's tokenizer"
        )
    return tokens


def sliding_window_nll(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    progress: bool = False,
) -> EvalResult:
    """Score every token of `tokens` (N,) from position 1 on, once, with up to `context` tokens of history.

    `context` defaults to the model's context_length and `stride` to `context` (non-overlapping windows);
    `device` defaults to where the model's weights are (a given one moves the model there). The model
    runs in eval mode, its previous mode restored after.
    """
    net = unwrap(model)
    cfg = net.config
    context = cfg.context_length if context is None else context
    stride = context if stride is None else stride
    tokens = check_tokens(tokens, cfg, context, stride, batch_size)
    torch_dtype(dtype)  # a clear error for an unknown dtype before any work
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(dev)

    def score(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        x, y, mask = x.to(dev), y.to(dev), mask.to(dev)
        with torch.inference_mode(), autocast(dev, dtype):
            h = net.transformer(x)  # (B, L, d_model)
            # logits only where a target is scored: with stride < context this skips most of the
            # 50,257-wide head, the largest matmul of the card's model
            # and the fused head + cross-entropy never holds the (M, V) logits
            nll = linear_cross_entropy(h[mask], net.lm_head.weight, y[mask], reduction="sum")
        return nll.item()

    was_training = net.training
    net.eval()
    try:
        return score_windows(
            tokens, score, context=context, stride=stride, batch_size=batch_size, progress=progress
        )
    finally:
        net.train(was_training)


def check_settings(n_tokens: int, context: int, stride: int, batch_size: int, model_context: int) -> None:
    """One-line errors for settings the sliding window cannot use."""
    if context <= 0 or context > model_context:
        raise UserError(
            f"--context {context} is outside 1..{model_context} (the model's context_length); "
            f"pass a --context in 1..{model_context} or leave it unset"
        )
    if stride <= 0 or stride > context:
        raise UserError(
            f"--stride {stride} must be in 1..{context} (the context); a larger stride would skip tokens"
        )
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if n_tokens < 2:
        raise UserError(
            f"only {n_tokens} token(s) to evaluate; perplexity needs at least 2 (give more text or raise --max-tokens)"
        )


# ---- inputs ----------------------------------------------------------------------------------------


def split_tokens(data_dir: str | Path, split: str = "val", max_tokens: int | None = None) -> torch.Tensor:
    """A prepared data folder's split, its shards concatenated (at most `max_tokens`), as int64 (N,)."""
    if Path(data_dir).is_file():
        raise UserError(
            f"--data {data_dir} is a file, not a data folder; pass a `nanogpt prepare` folder, "
            "or a text file with --text"
        )
    parts, total = [], 0
    for shard in TokenData(data_dir).split(split):
        take = len(shard) if max_tokens is None else min(len(shard), max_tokens - total)
        parts.append(np.asarray(shard[:take], dtype=np.int64))
        total += take
        if max_tokens is not None and total >= max_tokens:
            break
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """A `.jsonl` file's `text_field` values (one document per line), or any other file as one document."""
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"--text {p} is a folder; pass a .txt or .jsonl file, or a prepared data folder with --data"
        )
    if not p.is_file():
        raise UserError(f"text file {p} not found; pass an existing .txt or .jsonl file to --text")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{p} is not UTF-8 text; convert it to UTF-8 or prepare it with `nanogpt prepare`"
        ) from None
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        return [raw]
    docs = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {i} is not valid JSON ({e.msg}); fix the line or remove it") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(
                f"{p} line {i} has no string field {text_field!r}; name the right one with --text-field"
            )
        docs.append(obj[text_field])
    return docs


def text_tokens(path: str | Path, text_field: str = "text", max_tokens: int | None = None) -> torch.Tensor:
    """Tokens of a text/JSONL file, documents joined with `<|endoftext|>`, as int64 (N,)."""
    docs = [d for d in read_documents(path, text_field) if d]
    if not any(d.strip() for d in docs):
        raise UserError(f"{path} holds no text to evaluate; pass a file with some text in it")
    tok = get_tokenizer()
    ids: list[int] = []
    for i, doc_ids in enumerate(tok.encode_batch(docs)):
        if i:
            ids.append(tok.eot_id)
        ids.extend(doc_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)
