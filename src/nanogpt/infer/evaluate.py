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

Two ways to read a split whose documents are joined by `<|endoftext|>`:

- per document (`per_document=True`, what `nanogpt eval` does by default): lm-evaluation-harness's
  `loglikelihood_rolling` convention. Each document is scored on its own, as `[<|endoftext|>] + doc`:
  its first token is predicted from the separator alone (lm-eval's prefix token), no separator is a
  target, and the bytes are the UTF-8 bytes of the document's text. The windows are lm-eval's rolling
  windows (`document_windows`): with stride = context a document's log-likelihood equals lm-eval's.
- as one stream (`per_document=False`, `nanogpt eval --stream`): the windows run across documents, so a
  document's first tokens see the end of the previous one, each separator is a target, and it counts as
  the 13 bytes of its text; on short documents bits per byte comes out a few percent off lm-eval's.

    result = sliding_window_nll(load_model("runs/demo"), split_tokens("data/builtin", "val"), stride=256)
    nlls = document_nlls(load_model("runs/demo"), [tok.encode(t) for t in texts])  # one total per text
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanogpt.config import ModelConfig
from nanogpt.data.shards import TokenData
from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.errors import SettingError, UserError
from nanogpt.kernels.device import autocast, torch_dtype
from nanogpt.kernels.ops import linear_cross_entropy
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import unwrap
from nanogpt.train.session import perplexity


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
    mode: str = "stream"  # "documents": each scored on its own (lm-eval's convention); "stream": joined
    documents: int | None = None  # how many documents were scored ("documents" mode)

    @classmethod
    def of(
        cls, total_nll: float, n: int, n_bytes: int, context: int, stride: int, seconds: float, **extra: Any
    ) -> EvalResult:
        """The figures of `n` scored tokens whose NLLs sum to `total_nll` (nats) over `n_bytes` bytes."""
        mean = total_nll / n
        return cls(
            tokens_scored=n,
            mean_nll=mean,
            perplexity=perplexity(mean),
            bits_per_byte=bits_per_byte(total_nll, n_bytes),
            n_bytes=n_bytes,
            context=context,
            stride=stride,
            seconds=seconds,
            tokens_per_s=n / seconds if seconds > 0 else float("inf"),
            **extra,
        )


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


def document_windows(n_tokens: int, context: int, stride: int) -> Iterator[Window]:
    """The rolling windows that score targets 1 .. n_tokens - 1 of one sequence (`[EOT] + doc`) once each.

    The first window scores the first `context` targets; each next one scores up to `stride` new ones,
    fed the `context` tokens before its last target (the last window too, reaching back over targets
    already scored). With stride = context these are lm-evaluation-harness's `loglikelihood_rolling`
    windows (its `get_rolling_token_windows` with `context_len=1`). Needs 1 <= stride <= context.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride={stride}, context={context}")
    last = min(context, n_tokens - 1)  # index of the last target scored so far
    if last < 1:
        return
    yield Window(0, last, last)
    while last < n_tokens - 1:
        end = min(last + stride, n_tokens - 1)  # this window's last target
        start = end - context  # > 0: last >= context here
        yield Window(start, context, end - last)
        last = end


def split_documents(tokens: torch.Tensor) -> list[torch.Tensor]:
    """A token stream cut at its `<|endoftext|>` separators: the documents, separators and empty ones dropped."""
    ends = (tokens == EOT_ID).nonzero().flatten().tolist() + [len(tokens)]
    docs, start = [], 0
    for end in ends:
        if end > start:
            docs.append(tokens[start:end])
        start = end + 1
    return docs


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
# the same, but one summed NLL per window (row) of the batch: what tells documents apart
RowScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Sequence[float]]


def _progress_bar(total: int, progress: bool) -> tqdm:
    # the training bar's rule: on stderr whenever asked for, a terminal or not (a log file of a long
    # evaluation shows how far it got); `nanogpt eval --no-progress` turns it off
    return tqdm(
        total=total, desc="eval", unit="tok", file=sys.stderr, dynamic_ncols=True, disable=not progress
    )


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
    bar = _progress_bar(len(tokens) - 1, progress)
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            total_nll += score(*_batch(tokens, chunk))
            bar.update(sum(w.scored for w in chunk))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    n = len(tokens) - 1
    return EvalResult.of(total_nll, n, count_bytes(tokens[1:]), context, stride, seconds)


def score_documents(
    docs: Sequence[torch.Tensor],
    score: RowScoreFn,
    *,
    context: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> list[float]:
    """Each document's total NLL (nats), scored on its own as `[EOT] + doc` through `document_windows`.

    Windows of different documents share batches: they are cut from one flat tensor of all the sequences,
    and no window reaches outside its own document.
    """
    eot = torch.tensor([EOT_ID], dtype=torch.long)
    seqs = [torch.cat([eot, torch.as_tensor(d, dtype=torch.long)]) for d in docs]
    windows: list[Window] = []
    owner: list[int] = []  # the document of each window
    offset = 0
    for i, seq in enumerate(seqs):
        for w in document_windows(len(seq), context, stride):
            windows.append(Window(offset + w.start, w.length, w.scored))
            owner.append(i)
        offset += len(seq)
    flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
    nlls = [0.0] * len(seqs)  # Python float64 sums
    bar = _progress_bar(sum(len(s) - 1 for s in seqs), progress)
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            for i, nll in zip(owner[b : b + batch_size], score(*_batch(flat, chunk)), strict=True):
                nlls[i] += float(nll)
            bar.update(sum(w.scored for w in chunk))
    finally:
        bar.close()
    return nlls


def evaluate_documents(
    tokens: torch.Tensor,
    score: RowScoreFn,
    *,
    context: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> EvalResult:
    """Either backend's per-document evaluation of a checked token stream (`score_windows`'s twin): each
    `<|endoftext|>`-separated document on its own, bytes of the documents' text only."""
    docs = split_documents(tokens)
    n = sum(len(d) for d in docs)
    n_bytes = sum(count_bytes(d) for d in docs)  # the documents' own text: no separator
    if n == 0 or n_bytes == 0:  # before the progress bar: a refusal is its one line alone
        raise SettingError(
            "per_document",
            "no document holds text between the <|endoftext|> separators; use `per_document=False`",
        )
    t0 = time.perf_counter()
    total_nll = math.fsum(
        score_documents(docs, score, context=context, stride=stride, batch_size=batch_size, progress=progress)
    )
    seconds = time.perf_counter() - t0
    return EvalResult.of(
        total_nll, n, n_bytes, context, stride, seconds, mode="documents", documents=len(docs)
    )


def score_conversations(
    convs: Sequence[tuple[np.ndarray, np.ndarray]],
    score: ScoreFn,
    *,
    context: int,
    batch_size: int,
    progress: bool = False,
) -> EvalResult:
    """Chat data as fine-tuning trains it: each conversation whole in its own row, only its trained targets
    (the assistant's tokens and their end of turn) scored. `convs`: (ids, trained) pairs, `split_conversations`'s."""
    longest = max((len(ids) for ids, _ in convs), default=0)
    if longest > context + 1:
        raise SettingError(
            "context",
            f"a conversation of {longest} tokens does not fit the model's context ({context} + 1); "
            "it cannot be scored whole",
        )
    n = sum(int(t[1:].sum()) for _, t in convs)
    if n == 0:
        raise SettingError(
            "data", "no conversation holds a trained (assistant) token; score it with `--stream`"
        )
    total_nll = 0.0
    t0 = time.perf_counter()
    bar = _progress_bar(n, progress)
    try:
        for b in range(0, len(convs), batch_size):
            chunk = convs[b : b + batch_size]
            width = max(len(ids) for ids, _ in chunk) - 1
            x = torch.full((len(chunk), width), EOT_ID, dtype=torch.long)
            y, mask = x.clone(), torch.zeros_like(x, dtype=torch.bool)
            for r, (ids, trained) in enumerate(chunk):
                k = len(ids) - 1  # padding after the conversation is never a target
                x[r, :k], y[r, :k] = torch.from_numpy(ids[:-1]), torch.from_numpy(ids[1:])
                mask[r, :k] = torch.from_numpy(trained[1:])
            total_nll += score(x, y, mask)
            bar.update(int(mask.sum()))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n_bytes = sum(count_bytes(ids[1:][t[1:]]) for ids, t in convs)
    return EvalResult.of(
        total_nll, n, n_bytes, context, context, seconds, mode="conversations", documents=len(convs)
    )


def conversation_nll(
    model: torch.nn.Module,
    convs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    progress: bool = False,
) -> EvalResult:
    """The held-out loss of chat data on its assistant tokens (`score_conversations`) for a PyTorch model."""
    cfg = unwrap(model).config
    check_conversations(convs, cfg, batch_size)
    with _scoring(model, device, dtype) as (net, dev):
        return score_conversations(
            convs,
            _scorer(net, dev, dtype),
            context=cfg.context_length,
            batch_size=batch_size,
            progress=progress,
        )


def check_conversations(
    convs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: ModelConfig, batch_size: int
) -> None:
    """`check_tokens` for conversations scored whole: their ids and the batch size (two padding ids: a short
    split is no error here; `score_conversations` refuses one that does not fit)."""
    flat = np.concatenate([ids for ids, _ in convs]) if convs else np.zeros(0, dtype=np.int64)
    check_tokens(np.append(flat, [0, 0]), cfg, cfg.context_length, cfg.context_length, batch_size)


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


def _scorer(net: NanoGPTLMHeadModel, dev: torch.device, dtype: str) -> ScoreFn:
    """The PyTorch model's summed NLL of a batch's scored targets."""

    def score(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        x, y, mask = x.to(dev), y.to(dev), mask.to(dev)
        with torch.inference_mode(), autocast(dev, dtype):
            h = net.transformer(x)  # (B, L, d_model)
            # logits only where a target is scored: with stride < context this skips most of the
            # 50,257-wide head, the largest matmul of the card's model
            # and the fused head + cross-entropy never holds the (M, V) logits
            nll = linear_cross_entropy(h[mask], net.lm_head.weight, y[mask], reduction="sum")
        return nll.item()

    return score


def _row_scorer(net: NanoGPTLMHeadModel, dev: torch.device, dtype: str) -> RowScoreFn:
    """The same, one sum per window (row of the batch): each scored target's NLL, added up by row."""

    def score(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list[float]:
        x, y, mask = x.to(dev), y.to(dev), mask.to(dev)
        with torch.inference_mode(), autocast(dev, dtype):
            h = net.transformer(x)
            nll = linear_cross_entropy(h[mask], net.lm_head.weight, y[mask], reduction="none")
        rows = mask.nonzero()[:, 0]  # the row of each scored target, in h[mask]'s (row-major) order
        sums = torch.zeros(x.size(0), dtype=torch.float64, device=dev).index_add_(0, rows, nll.double())
        return sums.tolist()

    return score


@contextlib.contextmanager
def _scoring(
    model: torch.nn.Module, device: str | torch.device | None, dtype: str
) -> Iterator[tuple[NanoGPTLMHeadModel, torch.device]]:
    """(network, device) in eval mode for the duration; `device` None keeps the model where it is."""
    net = unwrap(model)
    torch_dtype(dtype)  # a clear error for an unknown dtype before any work
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(dev)
    was_training = net.training
    net.eval()
    try:
        yield net, dev
    finally:
        net.train(was_training)


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
    per_document: bool = False,
) -> EvalResult:
    """Score `tokens` (N,) with up to `context` tokens of history: as one stream (every token from position
    1 on, once), or with `per_document` each `<|endoftext|>`-separated document on its own (lm-eval's
    convention, see the module docstring).

    `context` defaults to the model's context_length and `stride` to `context` (non-overlapping windows);
    `device` defaults to where the model's weights are (a given one moves the model there). The model
    runs in eval mode, its previous mode restored after.
    """
    cfg = unwrap(model).config
    context = cfg.context_length if context is None else context
    stride = context if stride is None else stride
    tokens = check_tokens(tokens, cfg, context, stride, batch_size)
    window = dict(context=context, stride=stride, batch_size=batch_size)
    with _scoring(model, device, dtype) as (net, dev):
        if per_document:
            return evaluate_documents(tokens, _row_scorer(net, dev, dtype), **window, progress=progress)
        return score_windows(tokens, _scorer(net, dev, dtype), **window, progress=progress)


def document_nlls(
    model: torch.nn.Module,
    docs: Sequence[Sequence[int]],
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
) -> list[float]:
    """The total NLL (nats) of each document's tokens, each scored on its own after `<|endoftext|>`: with
    the default stride, minus lm-eval's `loglikelihood_rolling` of the document's text."""
    cfg = unwrap(model).config
    context = cfg.context_length if context is None else context
    stride = context if stride is None else stride
    flat = [t for d in docs for t in d]
    # the ids and the settings (two padding ids: a short document is no error here)
    check_tokens(torch.tensor(flat + [0, 0]), cfg, context, stride, batch_size)
    with _scoring(model, device, dtype) as (net, dev):
        tensors = [torch.as_tensor(list(d), dtype=torch.long) for d in docs]
        return score_documents(
            tensors, _row_scorer(net, dev, dtype), context=context, stride=stride, batch_size=batch_size
        )


def check_settings(n_tokens: int, context: int, stride: int, batch_size: int, model_context: int) -> None:
    """One-line errors for settings the sliding window cannot use (`SettingError`: a command names its flags)."""
    if context <= 0 or context > model_context:
        raise SettingError(
            "context",
            f"`context` {context} is outside 1..{model_context} (the model's context_length); "
            f"pass a `context` in 1..{model_context} or leave it unset",
        )
    if stride <= 0 or stride > context:
        raise SettingError(
            "stride",
            f"`stride` {stride} must be in 1..{context} (the context); a larger stride would skip tokens",
        )
    if batch_size <= 0:
        raise SettingError("batch_size", f"`batch_size` {batch_size} must be at least 1")
    if n_tokens < 2:
        raise SettingError(
            "max_tokens",
            f"only {n_tokens} token(s) to evaluate; perplexity needs at least 2 "
            "(give more text or raise `max_tokens`)",
        )


# ---- inputs ----------------------------------------------------------------------------------------


def split_tokens(data_dir: str | Path, split: str = "val", max_tokens: int | None = None) -> torch.Tensor:
    """A prepared data folder's split, its shards concatenated (at most `max_tokens`), as int64 (N,)."""
    if Path(data_dir).is_file():
        raise SettingError(
            "data",
            f"`data` {data_dir} is a file, not a data folder; pass a `nanogpt prepare` folder, "
            "or a text file with `text`",
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
        raise SettingError(
            "text",
            f"`text` {p} is a folder; pass a .txt or .jsonl file, or a prepared data folder with `data`",
        )
    if not p.is_file():
        raise SettingError("text", f"text file {p} not found; pass an existing .txt or .jsonl file to `text`")
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
            raise SettingError(
                "text_field",
                f"{p} line {i} has no string field {text_field!r}; name the right one with `text_field`",
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
