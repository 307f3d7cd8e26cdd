"""The `nanogpt sample` command: stream text from a checkpoint (or a random-init preset), either backend.

Sampling and the KV-cached generator are `nanogpt.infer.generate` (`nanogpt.mlx.generate` with
`--backend mlx`); this module reads the flags, checks them all before the model loads, picks the backend,
and writes the text as it arrives, with one timing line per sample on stderr.

    nanogpt sample --model runs/demo --prompt "Once upon a time" --max-new-tokens 100 --seed 1337
    nanogpt sample --model runs/sft --chat "Name three primary colours."   # one turn in the chat template
    nanogpt sample --model runs/sft --chat                                 # a conversation on stdin
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import torch

from nanogpt.commands.options import add_backend, add_device, add_dtype, refuse_mlx_dtype
from nanogpt.config import PRESETS, preset
from nanogpt.data.chat import prompt_ids as chat_prompt_ids
from nanogpt.data.tokenizer import Tokenizer, get_tokenizer
from nanogpt.errors import ArgumentParser, SettingError, UserError
from nanogpt.infer.generate import PromptTooLong, generate, stream_text
from nanogpt.infer.sampling import SamplingParams, make_generator
from nanogpt.kernels.device import resolve_device
from nanogpt.kernels.quant import apply_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model

# The flag (with an example value) that sets each field the library may refuse by name (`SettingError`)
FLAG_EXAMPLES = {
    "temperature": "--temperature 0.8",
    "top_k": "--top-k 50",
    "top_p": "--top-p 0.9",
    "seed": "--seed 1337",
    "max_tokens": "--max-new-tokens 100",
}


def with_flag(e: SettingError) -> UserError:
    """A library's refusal of one setting as this command says it: with the flag that sets it."""
    if isinstance(e, PromptTooLong):
        return UserError(
            f"prompt is {e.length} tokens, the context is {e.context_length}; "
            f"shorten it or pass --crop to keep the last {e.context_length} tokens"
        )
    example = FLAG_EXAMPLES.get(e.setting)
    return UserError(f"{e}; e.g. {example}" if example else str(e))


@dataclass(frozen=True)
class SampleStats:
    tokens: int
    first_token_s: float  # prefill + first sample
    total_s: float

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (the incremental decode rate, prefill excluded)."""
        if self.tokens < 2 or self.total_s <= self.first_token_s:
            return 0.0
        return (self.tokens - 1) / (self.total_s - self.first_token_s)

    def line(self) -> str:
        overall = self.tokens / self.total_s if self.total_s > 0 else 0.0
        return (
            f"{self.tokens} tokens in {self.total_s:.2f} s ({overall:.1f} tok/s; first token after "
            f"{self.first_token_s * 1000:.0f} ms, then {self.decode_tok_s:.1f} tok/s)"
        )


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; an empty prompt starts a new document: `<|endoftext|>` alone, as in training data."""
    return tok.encode(prompt) if prompt else [tok.eot_id]


def write_stream(out: TextIO, prompt: str, tokens: Iterable[int], tok: Tokenizer) -> SampleStats:
    """Echo `prompt`, then write the text of `tokens` to `out` as each one arrives; timed.

    `tokens` is usually a fresh `generate(...)`: it is lazy, so the clock starts before the prefill.
    """
    start = time.perf_counter()
    times: list[float] = []

    def timed() -> Iterator[int]:
        for t in tokens:
            times.append(time.perf_counter())
            yield t

    out.write(prompt)
    out.flush()
    for piece in stream_text(timed(), tok):
        if piece:
            out.write(piece)
            out.flush()
    end = time.perf_counter()
    first = (times[0] if times else end) - start
    return SampleStats(tokens=len(times), first_token_s=first, total_s=end - start)


def load_sampling_model(
    model_path: str | None, preset_name: str | None, device: torch.device, seed: int
) -> NanoGPTLMHeadModel:
    """A trained checkpoint, or a random-init preset (seeded, without touching the global RNG)."""
    if model_path is not None:
        return load_model(model_path, device=device)
    cfg = preset(preset_name or "card")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NanoGPTLMHeadModel(cfg)
    return model.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt sample", description="generate text from a checkpoint (KV cache, streaming)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a run folder or a checkpoint folder")
    src.add_argument("--preset", choices=list(PRESETS), help="a random-init model (smoke tests)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    text.add_argument("--prompt-file", help="a UTF-8 text file whose whole content is the prompt")
    text.add_argument(
        "--chat",
        nargs="?",
        const="",
        metavar="MESSAGE",
        help="chat in the template fine-tuning trains on: one reply to MESSAGE, or without MESSAGE a "
        "conversation read line by line from stdin (end it with EOF or /quit)",
    )
    p.add_argument("--system", help="with --chat: a system message placed first")
    d = SamplingParams()  # the defaults are the shared ones
    p.add_argument("--max-new-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass; 1 disables")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument(
        "--crop", action="store_true", help="keep the last context_length tokens of a too-long prompt"
    )
    add_device(p)
    add_dtype(p, help="autocast precision, or int8 weights (weight-only, fp32 activations)", int8=True)
    add_backend(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="run each one-token decode step through torch.compile (the first step compiles, taking "
        "seconds to a minute; pays only for long generations, see docs/benchmarks.md)",
    )
    return p


NewTokens = Callable[[list[int]], Iterator[int]]  # prompt ids -> the reply's tokens, as they come


def _mlx_new_tokens(args: argparse.Namespace, params: SamplingParams) -> NewTokens:
    """The MLX model, loaded once; call i samples with seed + i (MLX draws from keys, not a stateful generator)."""
    from nanogpt.mlx import load_model as mlx_load_model
    from nanogpt.mlx.generate import generate as mlx_generate

    if args.model is None:
        raise UserError("--backend mlx needs --model (a checkpoint); --preset random init is PyTorch only")
    model = mlx_load_model(args.model)
    calls = iter(range(1 << 62))
    return lambda ids: mlx_generate(model, ids, replace(params, seed=args.seed + next(calls)), crop=args.crop)


def _torch_new_tokens(args: argparse.Namespace, params: SamplingParams, vocab_size: int) -> NewTokens:
    device = resolve_device(args.device)
    model = load_sampling_model(args.model, args.preset, device, args.seed)
    if model.config.vocab_size != vocab_size:
        raise UserError(
            f"the model's vocab_size is {model.config.vocab_size}, the GPT-2 tokenizer has {vocab_size}; "
            "sample from a model trained with that tokenizer"
        )
    dtype = apply_dtype(model, args.dtype)
    # one generator for the whole run: samples differ from each other, the run repeats with its seed
    generator = make_generator(params.seed, device)
    # generate() checks the prompt against the context when called, before anything is printed
    return lambda ids: generate(
        model,
        ids,
        replace(params, seed=None),
        generator=generator,
        crop=args.crop,
        dtype=dtype,
        compile=args.compile,
    )


def _read_turn() -> str | None:
    """The next user message of an interactive chat (stdin, one line); None at EOF or /quit."""
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return None
        if line.strip():
            return line.rstrip("\n")


def chat(args: argparse.Namespace, new_tokens: NewTokens, tok: Tokenizer) -> None:
    """`--chat`: one reply to the message, or turns read from stdin, each reply streamed as it comes."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        text = args.chat or _read_turn()
        if text is None:
            return
        messages.append({"role": "user", "content": text})
        reply: list[int] = []

        def kept(tokens: Iterable[int], reply: list[int] = reply) -> Iterator[int]:
            for t in tokens:
                reply.append(t)
                yield t

        stats = write_stream(sys.stdout, "", kept(new_tokens(chat_prompt_ids(messages))), tok)
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"[reply] {stats.line()}", file=sys.stderr)
        if args.chat:
            return
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def read_prompt_file(path: str | Path) -> str:
    """The whole text of a prompt file (UTF-8); an empty file starts a new document, as `--prompt ""` does."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"prompt file {p} is a folder; pass a text file to --prompt-file")
    if not p.is_file():
        raise UserError(f"prompt file {p} not found; pass an existing text file to --prompt-file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"prompt file {p} cannot be read ({e.strerror}); check its permissions") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every flag is checked before the model loads: a typo costs no loading time
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 0; e.g. --max-new-tokens 100")
    try:
        params = SamplingParams(
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=args.seed,
        )
    except SettingError as e:
        raise with_flag(e) from None
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be at least 1; e.g. --num-samples 1")
    refuse_mlx_dtype(args)
    if args.compile and args.backend == "mlx":
        raise UserError("--compile is torch.compile; the mlx backend has no such step, drop --compile")
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    if args.chat is not None and args.num_samples > 1:
        raise UserError("--num-samples applies to --prompt; --chat gives one reply per turn, so drop it")
    if args.system is not None and args.chat is None:
        raise UserError("--system is the system message of a --chat; add --chat, or put the text in --prompt")
    tok = get_tokenizer()
    prompt_ids = encode_prompt(tok, args.prompt)
    if args.backend == "mlx":
        new_tokens = _mlx_new_tokens(args, params)
    else:
        new_tokens = _torch_new_tokens(args, params, tok.vocab_size)
    streams = (new_tokens(prompt_ids) for _ in range(args.num_samples))
    try:
        if args.chat is not None:
            chat(args, new_tokens, tok)
            return 0
        for i, tokens in enumerate(streams):
            if i:
                sys.stdout.write("\n" + "-" * 40 + "\n")
            stats = write_stream(sys.stdout, args.prompt, tokens, tok)
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[sample {i + 1}/{args.num_samples}] {stats.line()}", file=sys.stderr)
    except SettingError as e:  # the prompt against the context, checked before anything is printed
        raise with_flag(e) from None
    except BrokenPipeError:  # `nanogpt sample ... | head`: the reader left, which is not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet
    return 0
