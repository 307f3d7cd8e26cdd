"""Local teachers of any vocabulary: a Hugging Face causal-LM folder or a `.gguf` file, with its own tokenizer.

Their distributions are over *their* tokens, so the same-vocabulary divergences cannot be used; the method
picks what can:

- `sequence`: the teacher continues corpus prompts locally (batched, sampled `generate`, through its chat
  template when its tokenizer has one, else the plain text for a base model); `LocalReplies` answers the
  chat path's requests through the same answer cache, and `nanogpt.distill.sequence` writes the data
  folder and mixes it with the data, exactly as for a `chat:` teacher;
- `uld`: the teacher scores the student's windows as text, and the Universal Logit Distillation loss
  compares the two distributions at aligned positions (`nanogpt.distill.uld`).

    teacher = load_text_teacher("SmolLM2-135M-Instruct.Q4_1.gguf", "cpu")
    replies = LocalReplies(lambda: teacher, AnswerCache("cache.sqlite"), teacher_identity(path))(requests)
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from nanogpt.distill.client import AnswerCache, request_key
from nanogpt.distill.sequence import prompt_text
from nanogpt.errors import SettingError, UserError, missing_extra
from nanogpt.kernels.device import autocast, torch_dtype

REQUEST_PATH = "local/generate"  # the answer cache's endpoint name for replies generated here


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


class TextTeacher:
    """A frozen causal LM with its own tokenizer: `generate` replies to chat requests, `score` token ids."""

    module: Any  # a transformers causal LM: its generate and config are untyped to a checker

    def __init__(self, module: nn.Module, tokenizer: Any, name: str, dtype: str = "fp32") -> None:
        self.module, self.tokenizer, self.name, self.dtype = module.eval(), tokenizer, name, dtype
        for p in self.module.parameters():
            p.requires_grad_(False)
        cfg = self.module.config
        self.context_length = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**9
        )
        # a model may pad its output layer beyond the tokenizer: those logits name no token
        self.vocab_size = min(len(tokenizer), int(self.module.get_output_embeddings().weight.size(0)))
        eos = self.module.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def prompt_ids(self, request: dict[str, Any]) -> list[int]:
        """A chat request as the teacher's token ids: its chat template, else the corpus text (a base model)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt_text(request))["input_ids"]
        room = self.context_length - int(request["max_tokens"])
        if room < 1:
            raise SettingError(
                "reply_tokens",
                f"`reply_tokens` {request['max_tokens']} leaves no room for a prompt in the teacher's "
                f"{self.context_length}-token context; lower `reply_tokens`",
            )
        return ids[-room:]

    @torch.no_grad()
    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        """One batched, sampled `generate` (left-padded, seeded by the first request) for these requests."""
        prompts = [self.prompt_ids(r) for r in requests]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
        device = self.device
        # its own RNG stream: sampling here never moves the trainer's
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(requests[0].get("seed", 0)))
            with autocast(device, self.dtype):
                out = self.module.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max(int(r["max_tokens"]) for r in requests),
                    do_sample=True,
                    temperature=float(requests[0]["temperature"]),
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=self.pad_id,
                )
        replies = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            replies.append(self.tokenizer.decode(row[:stop], skip_special_tokens=True))
        return replies

    @torch.no_grad()
    def score(self, batch: list[list[int]], rows: list[list[int]]) -> torch.Tensor:
        """The teacher's logits (N, vocab) float32 at positions `rows[b]` of each token-id list `batch[b]`.

        One right-padded forward for the batch; only the asked rows are kept (a full (B, T, vocab) tensor
        of a 49K-token teacher would dwarf the student's).
        """
        longest = max(len(t) for t in batch)
        if longest > self.context_length:
            raise UserError(
                f"the teacher's context is {self.context_length} tokens, a student window is {longest} of its "
                "tokens; use a teacher with a longer context or a student with a shorter one"
            )
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, t in enumerate(batch):
            ids[b, : len(t)], mask[b, : len(t)] = torch.tensor(t, dtype=torch.long), 1
        device = self.device
        with autocast(device, self.dtype):
            logits = self.module(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        picked = [logits[b, torch.tensor(r, dtype=torch.long, device=device)] for b, r in enumerate(rows)]
        return torch.cat(picked)[:, : self.vocab_size].float()


def load_text_teacher(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> TextTeacher:
    """A Hugging Face causal-LM folder (with its tokenizer) or a `.gguf` file, offline, frozen, in fp32
    (`dtype` autocasts it)."""
    p = Path(path)
    torch_dtype(dtype)
    if not p.exists():
        raise UserError(f"teacher {p} not found; give a Hugging Face model folder or a .gguf file")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise missing_extra("a Hugging Face or .gguf teacher needs transformers", "hf") from None
    if is_gguf(p):
        try:  # transformers reads .gguf files through both
            import accelerate  # noqa: F401
            import gguf  # noqa: F401
        except ImportError as e:
            raise missing_extra(f"a .gguf teacher needs the {e.name} package", "hf") from None
        folder, extra = p.parent, {"gguf_file": p.name}
    else:
        cfg_file = p / "config.json"
        if not (cfg_file.is_file() and "model_type" in json.loads(cfg_file.read_text())):
            raise SettingError(
                "method",
                f"teacher {p} is not a Hugging Face model folder or a .gguf file; `method` sequence and `method` "
                "uld need a teacher with its own tokenizer (a nanogpt run shares the student's: use `method` "
                "forward_kl)",
            )
        folder, extra = p, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError) as e:
        raise SettingError(
            "teacher",
            f"cannot load the tokenizer of teacher {p} ({str(e).splitlines()[0][:160]}); `method` sequence and "
            "`method` uld read the teacher's own tokenizer: save it beside the model",
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"teacher {p} has a slow (Python) tokenizer; save its fast tokenizer.json beside it")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the teacher {p}: {str(e).splitlines()[0][:200]}") from None
    if not getattr(
        model, "is_quantized", False
    ):  # a .gguf is de-quantized to fp32 already, and refuses .float()
        model = model.float()
    return TextTeacher(cast(Any, model).to(device), tokenizer, p.stem if is_gguf(p) else p.name, dtype)


def teacher_identity(path: str | Path) -> str:
    """The answer cache's name for a local teacher: its absolute path and its files' sizes and times.

    Replies are keyed by it, so a teacher replaced or retrained in place is asked again, never replayed.
    """
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"local:{p}#{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"


class LocalReplies:
    """The sequence-level `Answer` of a local teacher: cached replies first, batched generation for the rest.

    Every generated reply is cached at once (keyed like a `chat:` answer: teacher identity, model, request
    body), so an interrupted or resumed run never generates a reply twice; the teacher is loaded only when
    some reply is missing. `generate_calls`, `generated` and `cached` count what it cost.
    """

    def __init__(
        self, load: Callable[[], TextTeacher], cache: AnswerCache, identity: str, batch: int = 8
    ) -> None:
        self.load, self.cache, self.identity, self.batch = load, cache, identity, batch
        self.teacher: TextTeacher | None = None
        self.generate_calls = self.generated = self.cached = 0

    def __call__(self, requests: list[dict[str, Any]]) -> list[str | None]:
        keys = [request_key(self.identity, r["model"], REQUEST_PATH, r) for r in requests]
        replies: list[str | None] = [None] * len(requests)
        missing = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None and isinstance(hit.get("reply"), str):
                replies[i], self.cached = hit["reply"], self.cached + 1
            else:
                missing.append(i)
        for start in range(0, len(missing), self.batch):
            if self.teacher is None:
                self.teacher = self.load()
            chunk = missing[start : start + self.batch]
            texts = self.teacher.generate([requests[i] for i in chunk])
            self.generate_calls += 1
            for i, text in zip(chunk, texts, strict=True):
                self.cache.put(keys[i], requests[i], {"reply": text})
                replies[i], self.generated = text, self.generated + 1
        print(
            f"nanogpt distill: teacher replies: {self.cached} from the cache, {self.generated} generated "
            f"({self.generate_calls} generate calls)",
            file=sys.stderr,
        )
        return replies
