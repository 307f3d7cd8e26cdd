"""MLX sampling: greedy decoding with the KV cache equals uncached decoding, the sampling rules, seeds."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from nanogpt.infer.sampling import SamplingParams  # noqa: E402
from nanogpt.mlx.generate import generate, sample_next, top_k_filter, top_p_filter  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


def test_generate_greedy_equals_uncached_decoding():
    cfg = tiny_config(context_length=16)
    mx.random.seed(3)
    mm = MLXGPT(cfg)
    prompt = [464, 3290, 318]
    got = list(generate(mm, prompt, SamplingParams(max_tokens=10, temperature=0), stop_at_eot=False))
    seq = list(prompt)
    for _ in range(10):  # no cache: the whole sequence every step
        seq.append(int(mx.argmax(mm(mx.array([seq], dtype=mx.int32))[0, -1]).item()))
    assert got == seq[len(prompt) :]
    # past the 16-token context the window slides instead of failing
    assert (
        len(list(generate(mm, prompt, SamplingParams(max_tokens=30, temperature=0), stop_at_eot=False))) == 30
    )


def test_sampling_rules(tiny_cfg):
    logits = mx.array([[1.0, 3.0, 3.0, 2.0, 0.0]])
    kept = np.isfinite(np.array(top_k_filter(logits, 2)))
    assert kept.sum() == 2 and kept[0, 1] and kept[0, 2]  # exactly k, even with a tie at the k-th value
    probs = mx.array([[0.5, 0.3, 0.15, 0.05]])
    assert np.isfinite(np.array(top_p_filter(mx.log(probs), 0.8))).tolist() == [[True, True, False, False]]
    assert (
        int(sample_next(mx.array([[0.0, 5.0, 1.0]]), SamplingParams(temperature=0, top_k=None)).item()) == 1
    )
    mx.random.seed(0)
    mm = MLXGPT(tiny_cfg)

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=1.0, top_k=None, seed=seed)
        return list(generate(mm, [1, 2], params, stop_at_eot=False))

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
