"""The engine's attention job (`Job(..., attention=True)`): the model's own weights, read `prefill_chunk` tokens
per step beside running streams, queued like any job."""

import random

import pytest
import torch

from nanogpt.infer.generate import decode_steps
from nanogpt.infer.sampling import SamplingParams
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.serve.engine import AttentionMaps, Engine, Finished, Job, QueueFull, Token
from tests.tiny import tiny_config

GREEDY = SamplingParams(max_tokens=12, temperature=0)
LOOK = SamplingParams(max_tokens=0, temperature=0)  # what the app sends with an attention job


@pytest.fixture(scope="module")
def model() -> NanoGPTLMHeadModel:
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config()).eval()


def prompt(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(1000, 40000), k=n)


class CountingDecoder:
    """Records the tokens of every prefill call of the engine's real decoder (a wrapper, not a mock)."""

    def __init__(self, decoder) -> None:
        self.decoder, self.calls = decoder, []

    def prefill(self, tokens, cache, **kw):
        self.calls.append(("attention" if kw.get("attention") is not None else "prefill", tokens.size(1)))
        return self.decoder.prefill(tokens, cache, **kw)

    def __getattr__(self, name):
        return getattr(self.decoder, name)


def test_attention_job_gives_the_models_weights_beside_running_streams(model):
    p_att, p_long = prompt(60, 1), prompt(50, 2)
    expected: list[torch.Tensor] = []
    with torch.inference_mode():
        model(torch.tensor([p_att]), attention=expected)
    engine = Engine(model, max_batch=4, prefill_chunk=8, thread=False)
    engine.decoder = CountingDecoder(engine.decoder)
    stream = engine.submit(Job(prompt(3, 3), GREEDY))
    long = engine.submit(Job(p_long, GREEDY))
    look = engine.submit(Job(p_att, LOOK, attention=True))
    engine.close(drain_seconds=60, wait=False)  # run() returns once every job is done
    engine.run()
    events = list(look)
    assert isinstance(events[0], AttentionMaps) and events[1] == Finished("stop")
    w = events[0].weights
    assert w.shape == (model.config.n_layers, model.config.n_heads, 60, 60)
    torch.testing.assert_close(w, torch.stack([e[0] for e in expected]), atol=1e-5, rtol=0)
    # the streams gave what they give alone
    for p, h in ((prompt(3, 3), stream), (p_long, long)):
        assert [e.id for e in h if isinstance(e, Token)] == [t for t, _ in decode_steps(model, p, GREEDY)]
    # no forward read more than a prefill chunk's positions: an attention chunk and a prompt chunk took turns
    calls = engine.decoder.calls
    assert all(n <= 8 for _, n in calls)
    kinds = [k for k, _ in calls]
    assert kinds.count("attention") == 60 // 8 + 1
    both = kinds[: len(kinds) - kinds[::-1].index("prefill")]  # up to the last prompt chunk: both waited
    assert all(a != b for a, b in zip(both, both[1:], strict=False))  # they took turns, step by step


def test_attention_jobs_count_against_the_queue(model):
    engine = Engine(model, max_queue=1, thread=False)
    engine.submit(Job(prompt(5, 1), LOOK, attention=True))
    with pytest.raises(QueueFull):
        engine.submit(Job(prompt(5, 2), LOOK, attention=True))
    with pytest.raises(ValueError, match="context"):  # no "+1" of a scoring job: every token is read
        engine.submit_all([Job(prompt(65, 3), LOOK, attention=True)])
    engine.close(drain_seconds=30, wait=False)
    engine.run()


def test_a_cancelled_attention_job_leaves(model):
    engine = Engine(model, prefill_chunk=4, thread=False)
    h = engine.submit(Job(prompt(40, 1), LOOK, attention=True))
    h.cancel()
    engine.close(drain_seconds=30, wait=False)
    engine.run()
    assert list(h) == [Finished("cancelled")] and engine.active == 0
