"""The compiled decode step (`Decoder(model, compile=True)`, kernels/compiled.py) against the eager reference.

The bound: fp32 logits within ATOL (absolute) of the eager step's at every step of a greedy generation, and
the same greedy token wherever the eager logits' top two are further apart than ATOL (closer than that, the
order of two logits is rounding, and either token is right). One compilation serves every position of the
stream, a slide of its window included. The tiny model compiles in seconds (about 10-25 s under load here),
so these tests run in the default suite; they share one compiled stream (a module fixture).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters

from nanogpt import cli
from nanogpt.infer.generate import decode_steps
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.decode import Decoder
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache, SlotKVCache
from tests.tiny import tiny_config

ATOL = 1e-4  # fp32: compiled and eager logits differ by reduction order only (~1e-6 seen)
BF16_ATOL = 2e-2  # bf16: a few roundings of 0.004 apart (2e-3 seen)
PROMPT = [464, 3290, 286, 4881, 318]
NEW = 80  # past the tiny context (64): the window slides once, and the steps after it reuse the graph


def tiny_model() -> NanoGPTLMHeadModel:
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config()).eval()


@dataclass
class Run:
    tokens: list[int]
    logits: torch.Tensor  # (steps, V)
    graphs: int  # graphs dynamo captured during the run


def greedy_run(model: NanoGPTLMHeadModel, compile: bool) -> Run:
    before = counters["stats"]["unique_graphs"]
    steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=NEW, temperature=0), compile=compile))
    logits = torch.stack([lg for _, lg in steps])
    return Run([t for t, _ in steps], logits, counters["stats"]["unique_graphs"] - before)


@pytest.fixture(scope="module")
def runs() -> tuple[Run, Run]:
    """The same greedy generation, eager then compiled (the compiled one from a fresh dynamo state)."""
    model = tiny_model()
    eager = greedy_run(model, compile=False)
    torch._dynamo.reset()
    return eager, greedy_run(model, compile=True)


def test_one_compilation_serves_every_position(runs: tuple[Run, Run]) -> None:
    eager, compiled = runs
    assert eager.graphs == 0
    assert len(compiled.tokens) == NEW and compiled.graphs == 1  # 79 steps, a window slide: one graph


def test_compiled_logits_and_greedy_tokens_match_eager(runs: tuple[Run, Run]) -> None:
    eager, compiled = runs
    # the first token comes from the eager prefill in both; then each step's logits until the streams part
    # (they may part only where eager's top two logits are within ATOL: then both tokens are right)
    top2 = eager.logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > ATOL
    same = 0
    while same < NEW and compiled.tokens[same] == eager.tokens[same]:
        same += 1
    assert same == NEW or not clear[same], f"token {same} differs with eager's top two apart"
    assert clear.float().mean() > 0.9  # the comparison above is not vacuous
    diff = (compiled.logits[:same] - eager.logits[:same]).abs().max()
    assert diff <= ATOL, f"compiled logits differ from eager by {diff:.2e} > {ATOL}"


def test_static_view_equals_the_cache_eagerly() -> None:
    """The static view (every position, masked) gives the eager cache's logits with no compiler at all."""
    model = tiny_model()
    sliced, static = (KVCache.for_model(model.config, batch_size=2) for _ in range(2))
    prompt = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.inference_mode():
        model(prompt, sliced), model(prompt, static)
        for token in (11, 12, 13):
            x = torch.full((2, 1), token)
            want = model(x, sliced, last_only=True)
            got = model(x, static.static_step(), last_only=True)
            static.advance(1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert static.pos == sliced.pos == len(PROMPT) + 3
    torch.testing.assert_close(static.k[:, :, :, : static.pos], sliced.k[:, :, :, : sliced.pos])


def test_full_cache_refuses_a_static_step() -> None:
    cache = KVCache.for_model(tiny_config(), batch_size=1, max_len=4)
    cache.advance(4)
    with pytest.raises(ValueError, match="holds 4 positions; 5 requested"):
        cache.static_step()


def test_slot_caches_take_the_eager_step() -> None:
    """Serve's slots have per-row positions and no static view: a compiling decoder steps them eagerly."""
    model = tiny_model()
    eager, compiling = Decoder(model), Decoder(model, compile=True)
    before = counters["stats"]["unique_graphs"]
    outs = []
    for decoder in (eager, compiling):
        slots = SlotKVCache.for_model(model.config, slots=2)
        decoder.prefill(torch.tensor([PROMPT, PROMPT]), slots.rows(0, [len(PROMPT)] * 2))
        outs.append(decoder.step(torch.tensor([[11], [12]]), slots.rows(0, [1, 1])))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == before
    eager.release()


def test_sample_compile_writes_the_eager_text(ckpt, capsys) -> None:
    """`nanogpt sample --compile`: greedy text equal to the eager command's (a tiny model's top two logits are
    far apart at these few steps: the logits test above bounds the rest), through one compiled graph."""
    argv = ["sample", "--model", str(ckpt), "--prompt", "Hello", "--temperature", "0"]
    texts, graphs = [], []
    torch._dynamo.reset()  # a fresh compilation, so the count below sees it
    for extra in ([], ["--compile"]):
        before = counters["stats"]["unique_graphs"]
        assert cli.main([*argv, "--max-new-tokens", "12", *extra]) == 0
        texts.append(capsys.readouterr().out)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert texts[1] == texts[0] and len(texts[0]) > len("Hello\n")
    assert graphs == [0, 1]


def test_compiled_step_follows_changed_weights() -> None:
    """The graph multiplies by the decode copies: after the weights change (a training step between two
    samples), the next compiled decoder remakes them and its logits are the new weights' (no stale copy)."""
    model = tiny_model()

    def logits() -> torch.Tensor:  # a new decoder per call, as each `decode_steps` makes one
        cache = KVCache.for_model(model.config, batch_size=1)
        decoder = Decoder(model, compile=True)
        decoder.prefill(torch.tensor([PROMPT]), cache)
        return decoder.step(torch.tensor([[11]]), cache)

    before = logits()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = logits()
    with torch.inference_mode():  # the stock weights, no cache, no copies
        want = model(torch.tensor([[*PROMPT, 11]]))[:, -1:]
    torch.testing.assert_close(after, want, atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-2  # the change did move the logits
    Decoder(model).release()


def test_compiled_bf16_step_matches_eager_bf16() -> None:
    """bf16 (autocast, bf16 copies and cache) compiles too: logits within BF16_ATOL of the eager bf16 step's,
    each step fed the same token (bf16 keeps 8 bits: one rounding of a logit near 1 is 0.004)."""
    model = tiny_model()
    outs = []
    for compile in (False, True):
        decoder = Decoder(model, "bf16", compile=compile)
        cache = KVCache.for_model(model.config, batch_size=1, dtype=decoder.cache_dtype)
        decoder.prefill(torch.tensor([PROMPT]), cache)
        outs.append(torch.cat([decoder.step(torch.tensor([[t]]), cache) for t in (11, 12, 13, 14)]).float())
    assert outs[1].dtype == torch.float32 and outs[0].abs().max() > 0.1
    torch.testing.assert_close(outs[1], outs[0], atol=BF16_ATOL, rtol=0)
    Decoder(model).release()
