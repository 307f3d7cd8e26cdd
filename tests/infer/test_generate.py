import copy
import math
import pickle
import threading
from typing import NamedTuple

import pytest
import torch

from nanogpt import cli
from nanogpt.commands.sample import SampleStats
from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.errors import SettingError, UserError
from nanogpt.infer.generate import (
    PromptTooLong,
    decode_steps,
    generate,
    prepare_prompt,
    stream_text,
)
from nanogpt.infer.sampling import SamplingParams, candidates, sample_next, top_p_filter
from nanogpt.kernels import decode as decode_weights
from nanogpt.kernels.decode import DecodeLinear, Decoder, cpu_decode_kernel
from nanogpt.model.gpt import Linear, NanoGPTLMHeadModel
from tests.tiny import tiny_config

PROMPT = [464, 3290, 286, 4881, 318, 6342, 11, 290]  # 8 ordinary GPT-2 token ids


def model_with_context(context_length: int) -> NanoGPTLMHeadModel:
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config(context_length=context_length)).eval()


def record_input_lengths(model) -> list[int]:
    """Lengths of the token chunks the network is fed, call by call."""
    lengths: list[int] = []
    model.transformer.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].size(1)))
    return lengths


@torch.no_grad()
def uncached_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (V,) of the last position, from a full forward pass with no cache."""
    return model(torch.tensor([ids]))[0, -1]


# --- sampling math ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, top_k, top_p, match",
    [(-0.1, None, 1.0, "temperature"), (math.nan, None, 1.0, "temperature"), (1.0, -1, 1.0, "top_k")]
    + [(1.0, None, p, "top_p") for p in (0.0, -0.5, 1.5)],
)
def test_bad_sampling_settings_are_refused(temperature, top_k, top_p, match):
    with pytest.raises(SettingError, match=match) as e:
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert e.value.setting == match and "--" not in str(e.value)  # the field's name; a command adds its flag


def test_sampling_params_defaults_and_openai_fields():
    d = SamplingParams()
    assert (d.max_tokens, d.temperature, d.top_k, d.top_p, d.seed, d.stop) == (100, 0.8, 50, 1.0, None, ())
    with pytest.raises(UserError, match="max_tokens=-1"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(UserError, match="seed="):
        SamplingParams(seed=2**64)
    with pytest.raises(UserError, match="stop"):
        SamplingParams(stop=("",))
    # neutral settings are left out, as a client would send them
    assert SamplingParams(max_tokens=8, temperature=0.7, top_k=None).openai_fields() == {
        "max_tokens": 8,
        "temperature": 0.7,
    }
    full = SamplingParams(max_tokens=8, top_k=5, top_p=0.9, seed=3, stop=("\n",)).openai_fields()
    assert full == {"max_tokens": 8, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 3, "stop": ["\n"]}


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    expected = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0, top_k=None)), expected)
    # greedy ignores the filters and the generator
    assert torch.equal(
        sample_next(logits, SamplingParams(top_k=3, top_p=0.1, temperature=0), torch.Generator()), expected
    )


def test_top_k_keeps_exactly_k_candidates():
    torch.manual_seed(0)
    logits = torch.randn(3, 500)
    logits[1, :10] = 5.0  # a 10-way tie at the top: still exactly k must survive
    for k in (1, 5, 50):
        c = candidates(logits, top_k=k)
        for row in range(3):
            kept = c.kept(row)
            assert len(kept) == k
            assert min(logits[row, sorted(kept)]) >= torch.topk(logits[row], k).values[-1]
    assert candidates(logits, top_k=5).kept(1) <= set(range(10))
    # 0, None and k >= V disable top-k
    assert all(len(candidates(logits, top_k=k).kept(0)) == 500 for k in (0, None, 500, 10_000))


def test_top_k_draws_only_and_all_of_the_top_k():
    logits = torch.linspace(0, 1, 100).repeat(4000, 1)  # (4000, 100), a flat-ish distribution
    draws = sample_next(logits, SamplingParams(top_k=4, temperature=1.0), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {96, 97, 98, 99}


def test_top_p_keeps_the_nucleus_of_a_hand_made_distribution():
    probs = torch.tensor([[0.10, 0.40, 0.30, 0.15, 0.05]])
    logits = probs.log()
    expected = {0.3: {1}, 0.5: {1, 2}, 0.75: {1, 2, 3}, 0.9: {0, 1, 2, 3}, 0.97: {0, 1, 2, 3, 4}}
    for p, kept in expected.items():
        assert candidates(logits, top_p=p).kept() == kept, p
        filtered = top_p_filter(logits, p)
        assert set(torch.nonzero(filtered[0] > -math.inf).flatten().tolist()) == kept
    assert candidates(logits, top_p=1.0).kept() == {0, 1, 2, 3, 4}
    # top-k first, then top-p on the survivors (renormalised: 0.4/0.7 already reaches 0.5)
    assert candidates(logits, top_k=2, top_p=0.5).kept() == {1}
    assert candidates(logits, top_k=3, top_p=0.9).kept() == {1, 2, 3}
    draws = sample_next(
        logits.repeat(2000, 1),
        SamplingParams(top_p=0.5, temperature=1.0, top_k=None),
        torch.Generator().manual_seed(0),
    )
    assert set(draws.tolist()) == {1, 2}


def test_temperature_reshapes_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0]).repeat(20_000, 1)
    for t in (0.5, 1.0, 2.0):
        draws = sample_next(
            logits, SamplingParams(temperature=t, top_k=None), torch.Generator().manual_seed(1)
        )
        freq = torch.bincount(draws, minlength=3).float() / len(draws)
        torch.testing.assert_close(freq, (logits[0] / t).softmax(-1), atol=0.015, rtol=0)


# --- prompt handling ---------------------------------------------------------------------------------


def test_prepare_prompt():
    assert prepare_prompt([1, 2, 3], 4) == [1, 2, 3]
    assert prepare_prompt([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    with pytest.raises(PromptTooLong, match="prompt is 5 tokens, the context is 4; shorten it or crop") as e:
        prepare_prompt([1, 2, 3, 4, 5], 4)
    assert "--" not in str(e.value) and e.value.setting == "crop"  # the command names its flag (--crop)
    assert prepare_prompt([1, 2, 3, 4, 5], 4, crop=True) == [2, 3, 4, 5]
    with pytest.raises(UserError, match="empty"):
        prepare_prompt([], 4)


def test_too_long_prompt_is_refused_at_the_call_and_crop_keeps_the_last_tokens(model, tiny_cfg):
    ctx = tiny_cfg.context_length
    long_prompt = (PROMPT * 10)[: ctx + 6]
    with pytest.raises(UserError, match=f"prompt is {ctx + 6} tokens, the context is {ctx}"):
        generate(model, long_prompt, SamplingParams(max_tokens=5))  # raised by the call, before any next()
    cropped = list(generate(model, long_prompt, SamplingParams(max_tokens=5, temperature=0), crop=True))
    assert cropped == list(generate(model, long_prompt[-ctx:], SamplingParams(max_tokens=5, temperature=0)))
    assert cropped != list(generate(model, long_prompt[:ctx], SamplingParams(max_tokens=5, temperature=0)))


# --- the generator ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, {"norm_position": "post", "tie_embeddings": False, "bias": False}])
def test_cached_greedy_equals_uncached_recomputation(variant):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config(**variant)).eval()
    lengths = record_input_lengths(model)
    steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=20, temperature=0)))
    # the prompt goes through once, then exactly one new token per step
    assert lengths == [len(PROMPT)] + [1] * 19
    seq = list(PROMPT)
    for token, logits in steps:
        ref = uncached_logits(model, seq)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert token == int(ref.argmax())
        seq.append(token)
    assert [t for t, _ in steps] == list(
        generate(model, PROMPT, SamplingParams(max_tokens=20, temperature=0), stop_at_eot=False)
    )


def test_cached_sampling_equals_uncached_sampling(model):
    tokens = list(
        generate(
            model,
            PROMPT,
            SamplingParams(max_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=7),
            stop_at_eot=False,
        )
    )
    g, seq = torch.Generator().manual_seed(7), list(PROMPT)
    for _ in range(15):
        seq.append(
            int(
                sample_next(
                    uncached_logits(model, seq)[None], SamplingParams(temperature=1.0, top_k=20, top_p=0.9), g
                )
            )
        )
    assert tokens == seq[len(PROMPT) :]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    def run(seed):
        return list(
            generate(
                model,
                PROMPT,
                SamplingParams(max_tokens=30, temperature=1.0, top_k=None, seed=seed),
                stop_at_eot=False,
            )
        )

    a = run(1337)
    assert len(a) == 30
    assert run(1337) == a
    assert run(1338) != a
    gen = torch.Generator().manual_seed(1337)  # a generator seeded alike gives the same stream
    assert (
        list(
            generate(
                model,
                PROMPT,
                SamplingParams(max_tokens=30, temperature=1.0, top_k=None),
                generator=gen,
                stop_at_eot=False,
            )
        )
        == a
    )


def test_stops_at_end_of_text(model):
    # A real network whose every output is the unit vector e0 (ln_f scale 0, bias e0) and whose EOT
    # embedding row (tied to lm_head) points along e0: EOT's logit is L, every other one is ~0.02 * N(0, 1),
    # so each step draws EOT with probability e^L / (e^L + 50,256) = 0.2.
    L = math.log(50256 / 4)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.token_embedding.weight[EOT_ID] = 0.0
        model.transformer.token_embedding.weight[EOT_ID, 0] = L
    assert (
        list(generate(model, PROMPT, SamplingParams(max_tokens=50, temperature=0))) == []
    )  # greedy: EOT at once, not yielded
    params = SamplingParams(max_tokens=100, temperature=1.0, top_k=None, seed=3)
    stopped = list(generate(model, PROMPT, params))
    full = list(generate(model, PROMPT, params, stop_at_eot=False))
    assert len(stopped) < 100 and EOT_ID not in stopped
    assert full[: len(stopped)] == stopped and full[len(stopped)] == EOT_ID
    assert full.count(EOT_ID) > 1  # without the stop, EOT is an ordinary token and generation goes on


def test_context_end_slides_the_window():
    model = model_with_context(16)
    lengths = record_input_lengths(model)
    steps = list(decode_steps(model, PROMPT + PROMPT[:2], SamplingParams(max_tokens=40, temperature=0)))
    fed = list(lengths)
    assert len(steps) == 40  # generation goes past the context
    # reference: re-run, without a cache, exactly the window the documented rule gives
    seq, start, slides = PROMPT + PROMPT[:2], 0, 0
    for token, logits in steps:
        if len(seq) - start > 16:  # the window would overflow: keep its last 16 // 2 tokens
            start, slides = len(seq) - 8, slides + 1
        ref = uncached_logits(model, seq[start:])
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert token == int(ref.argmax())
        seq.append(token)
    assert slides == 4  # when the window would reach 17, 26, 35 and 44 tokens
    # each slide is one re-prefill of 8 tokens; every other step feeds one token
    assert fed == [10] + [1] * 6 + ([8] + [1] * 8) * 3 + [8] + [1] * 5


def test_max_new_tokens_zero_and_negative(model):
    lengths = record_input_lengths(model)
    assert list(generate(model, PROMPT, SamplingParams(max_tokens=0))) == []
    assert lengths == []  # nothing to generate: the model is not even run
    with pytest.raises(UserError, match="max_tokens=-1"):
        generate(model, PROMPT, SamplingParams(max_tokens=-1))


def test_modes_do_not_leak_between_yields(model):
    model.train()
    it = generate(
        model, PROMPT, SamplingParams(max_tokens=3, temperature=1.0, seed=0), dtype="bf16", stop_at_eot=False
    )
    assert not model.training  # sampling runs with dropout off
    for _ in it:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert not torch.is_autocast_enabled("cpu")


def test_decode_copies_are_used_inside_decode_steps_only(model, monkeypatch):
    monkeypatch.setattr(decode_weights, "NATIVE_GEMV_TORCH", True)  # the torch >= 2.6 path on any torch
    ref = [logits for _, logits in decode_steps(model, PROMPT, SamplingParams(max_tokens=4, temperature=0))]
    qkv = model.transformer.blocks[0].attn.qkv_proj
    _, w, _, blocks = qkv.decode_copies[torch.float32]  # kept for the next stream
    assert blocks == torch.get_num_threads()  # fp32 on CPU: (in, out) column blocks, one per thread
    assert w.shape == (blocks, qkv.in_features, -(-qkv.out_features // blocks)) and w.is_contiguous()
    # a bf16 stream interleaved with an fp32 one: each step uses its own dtype's copies, nothing leaks
    b16 = decode_steps(model, PROMPT, SamplingParams(max_tokens=4, temperature=0), dtype="bf16")
    f32 = decode_steps(model, PROMPT, SamplingParams(max_tokens=4, temperature=0))
    mixed = []
    for (_, lb), (_, lf) in zip(b16, f32, strict=True):
        mixed.append(lf)
        assert 0 < float((lb - lf).norm() / lf.norm()) < 2e-2  # bf16 weights: close to fp32, not equal
        assert decode_weights._STEP_DTYPE.get() is None  # between two steps the forward is the stock one
    assert all(torch.equal(a, b) for a, b in zip(mixed, ref, strict=True))
    _, w16, _, blocks16 = qkv.decode_copies[torch.bfloat16]
    assert w16.dtype == torch.bfloat16 and blocks16 == 0  # CPU bf16: ATen's kernel, stock (out, in) layout
    assert w16.shape == (qkv.out_features, qkv.in_features)
    assert qkv.decode_copies[torch.float32][1] is w  # unchanged weights: the same copy, not remade
    with torch.no_grad():
        model.lm_head.weight[0] += 1.0  # the tied embedding row of token 0
    steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0)))
    seq = list(PROMPT)
    for token, logits in steps:  # the new weights are used, not stale copies
        torch.testing.assert_close(logits, uncached_logits(model, seq), atol=1e-5, rtol=1e-5)
        seq.append(token)
    assert type(qkv) is not Linear and isinstance(qkv, Linear) and repr(qkv) == "Linear(32, 96)"  # the swap
    Decoder(model).release()
    assert not any(isinstance(m, DecodeLinear) or hasattr(m, "decode_copies") for m in model.modules())
    assert type(qkv) is Linear  # its own class back


def test_decode_aware_layers_copy_and_pickle_as_plain_layers(model):
    list(
        decode_steps(model, PROMPT, SamplingParams(max_tokens=2, temperature=0))
    )  # the layers are decode-aware now
    x = torch.tensor([PROMPT])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any(isinstance(m, DecodeLinear) or hasattr(m, "decode_copies") for m in clone.modules())
        assert type(clone.lm_head) is Linear  # the tie survives too:
        assert clone.lm_head.weight is clone.transformer.token_embedding.weight
        torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)
    assert isinstance(model.lm_head, DecodeLinear) and model.lm_head.decode_copies  # the original keeps them
    Decoder(model).release()


def test_column_block_copies_give_the_stock_products(model, monkeypatch):
    # 3 blocks split qkv (96 wide) evenly; the other widths leave the last block zero-padded
    monkeypatch.setattr(decode_weights, "column_blocks", lambda device, dtype: 3)
    Decoder(model).release()
    steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0)))
    seq = list(PROMPT)
    for token, logits in steps:
        torch.testing.assert_close(logits, uncached_logits(model, seq), atol=1e-5, rtol=1e-5)
        seq.append(token)
    head = model.lm_head
    _, w, b, blocks = head.decode_copies[torch.float32]
    assert blocks == 3 and w.shape == (3, head.in_features, -(-head.out_features // 3)) and b is None
    assert head.out_features % 3 and not w[-1, :, head.out_features % 3 - 3 :].any()  # zero padding
    fc = model.transformer.blocks[0].ff.fc1
    x = torch.randn(2, 5, fc.in_features)  # several rows through the same copies
    with decode_weights._decode_call(x.device, torch.float32, one_row=False, use_copies=True):
        y = fc(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, fc.weight, fc.bias), atol=1e-5, rtol=1e-5)
    Decoder(model).release()


def test_one_token_bf16_steps_run_with_onednn_off_and_restore_it(model, monkeypatch):
    monkeypatch.setattr(decode_weights, "NATIVE_GEMV_TORCH", True)  # the torch >= 2.6 path on any torch
    seen: list[bool] = []
    hook = model.lm_head.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    try:
        steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0), dtype="bf16"))
        assert len(steps) == 3
        assert seen == [True, False, False]  # the many-row prefill keeps oneDNN, one-token steps do not
        assert torch.backends.mkldnn.enabled
        seen.clear()
        list(decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0)))
        assert seen == [True, True, True]  # fp32 goes to CPU BLAS: nothing to switch
    finally:
        hook.remove()


def test_before_torch_2_6_bf16_decode_keeps_onednn_and_transposed_copies(model, monkeypatch):
    monkeypatch.setattr(
        decode_weights, "NATIVE_GEMV_TORCH", False
    )  # ATen's x86 bf16 kernel is not fast there
    Decoder(model).release()
    seen: list[bool] = []
    hook = model.lm_head.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    try:
        b16 = [
            logits
            for _, logits in decode_steps(
                model, PROMPT, SamplingParams(max_tokens=3, temperature=0), dtype="bf16"
            )
        ]
    finally:
        hook.remove()
    f32 = [logits for _, logits in decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0))]
    assert seen == [True, True, True]
    qkv = model.transformer.blocks[0].attn.qkv_proj
    _, w, _, blocks = qkv.decode_copies[torch.bfloat16]
    assert blocks == 1 and w.shape == (1, qkv.in_features, qkv.out_features) and w.dtype == torch.bfloat16
    assert all(0 < float((a - b).norm() / b.norm()) < 2e-2 for a, b in zip(b16, f32, strict=True))


def test_cpu_decode_steps_of_two_threads_take_turns():
    assert torch.backends.mkldnn.enabled
    seen: list[tuple[str, bool]] = []
    inside, release = threading.Event(), threading.Event()

    def one_token_step() -> None:
        with cpu_decode_kernel(one_row=True):
            seen.append(("step", torch.backends.mkldnn.enabled))
            inside.set()
            release.wait(10)

    def prefill() -> None:
        with cpu_decode_kernel(one_row=False):
            seen.append(("prefill", torch.backends.mkldnn.enabled))

    a = threading.Thread(target=one_token_step)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=prefill)
    b.start()
    b.join(0.3)
    assert b.is_alive() and seen == [("step", False)]  # the prefill waits for the step to end
    release.set()
    a.join(10)
    b.join(10)
    assert seen == [("step", False), ("prefill", True)]  # and then runs with oneDNN on
    assert torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    with cpu_decode_kernel(one_row=True):
        pass
    assert not torch.backends.mkldnn.enabled  # a user's own setting is what comes back
    torch.backends.mkldnn.enabled = True


def test_concurrent_bf16_streams_match_solo_streams(model):
    prompts = [PROMPT, PROMPT[::-1]]
    solo = [
        [t for t, _ in decode_steps(model, p, SamplingParams(max_tokens=6, temperature=0), dtype="bf16")]
        for p in prompts
    ]
    got: dict[int, list[int]] = {}

    def stream(i: int) -> None:
        got[i] = [
            t
            for t, _ in decode_steps(
                model, prompts[i], SamplingParams(max_tokens=6, temperature=0), dtype="bf16"
            )
        ]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[0], got[1]] == solo
    assert torch.backends.mkldnn.enabled


def test_a_model_made_in_inference_mode_decodes(tiny_cfg):
    torch.manual_seed(0)
    with torch.inference_mode():  # its weights are inference tensors: no version counter
        model = NanoGPTLMHeadModel(tiny_cfg).eval()
    steps = list(decode_steps(model, PROMPT, SamplingParams(max_tokens=3, temperature=0)))
    seq = list(PROMPT)
    for token, logits in steps:
        with torch.inference_mode():
            torch.testing.assert_close(logits, uncached_logits(model, seq), atol=1e-5, rtol=1e-5)
        seq.append(token)


def test_bf16_autocast_generates_valid_tokens(model):
    tokens = list(
        generate(
            model,
            PROMPT,
            SamplingParams(max_tokens=12, temperature=1.0, seed=0),
            dtype="bf16",
            stop_at_eot=False,
        )
    )
    assert len(tokens) == 12 and all(0 <= t < 50257 for t in tokens)
    greedy16 = list(
        generate(model, PROMPT, SamplingParams(max_tokens=4, temperature=0), dtype="bf16", stop_at_eot=False)
    )
    assert len(greedy16) == 4


def test_stream_text_joins_multibyte_characters_split_across_tokens():
    tok = get_tokenizer()
    text = "naïve café — 日本語のテキスト 🙂👍 done"
    ids = tok.encode(text)

    def utf8_ok(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(utf8_ok(tok.decode_bytes([i])) for i in ids)  # some characters really are split
    pieces = list(stream_text(ids, tok))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # a stream that ends inside a character shows the replacement character, not an exception
    cut = next(n for n in range(1, len(ids)) if not utf8_ok(tok.decode_bytes(ids[:n])))
    assert "".join(stream_text(ids[:cut], tok)).endswith("\ufffd")


def test_sample_stats():
    s = SampleStats(tokens=101, first_token_s=0.5, total_s=2.5)
    assert s.decode_tok_s == pytest.approx(50.0)  # 100 tokens after the first, in 2 s
    assert "101 tokens in 2.50 s" in s.line() and "first token after 500 ms, then 50.0 tok/s" in s.line()
    assert SampleStats(tokens=1, first_token_s=0.1, total_s=0.1).decode_tok_s == 0.0
    assert SampleStats(tokens=0, first_token_s=0.0, total_s=0.0).line().startswith("0 tokens")


# --- the command ------------------------------------------------------------------------------------


class SampleRun(NamedTuple):
    rc: int
    out: str
    err: str


def sample_cli(capsys, *args: str) -> SampleRun:
    rc = cli.main(["sample", *args])
    out = capsys.readouterr()
    return SampleRun(rc, out.out, out.err)


def test_cli_seed_reproducibility(ckpt, capsys):
    base = ["--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "25", "--temperature", "1"]
    rc, a, err = sample_cli(capsys, *base, "--top-k", "0", "--seed", "1")
    assert rc == 0 and a.startswith("Hello") and len(a) > len("Hello\n")
    assert "25 tokens in" in err and "tok/s" in err
    assert sample_cli(capsys, *base, "--top-k", "0", "--seed", "1").out == a
    assert sample_cli(capsys, *base, "--top-k", "0", "--seed", "2").out != a


def test_cli_streams_what_generate_yields(model, ckpt, capsys):
    tok = get_tokenizer()
    prompt = "The café of"
    rc, out, _ = sample_cli(
        capsys, "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"
    )
    tokens = list(generate(model, tok.encode(prompt), SamplingParams(max_tokens=12, temperature=0)))
    assert rc == 0
    assert out == prompt + tok.decode_bytes(tokens).decode("utf-8", errors="replace") + "\n"


def test_cli_num_samples_and_empty_prompt(ckpt, capsys):
    rc, out, err = sample_cli(capsys, "--model", str(ckpt), "--max-new-tokens", "10", "--num-samples", "2")
    assert rc == 0
    first, second = out.split("\n" + "-" * 40 + "\n")
    assert first and second and first != second.rstrip("\n")
    assert "[sample 1/2]" in err and "[sample 2/2]" in err


def test_cli_errors_are_one_line(ckpt, capsys, tiny_cfg):
    long_prompt = "word " * (tiny_cfg.context_length + 10)
    rc, out, err = sample_cli(capsys, "--model", str(ckpt), "--prompt", long_prompt, "--max-new-tokens", "3")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "the context is 64; shorten it or pass --crop" in err
    rc, out, _ = sample_cli(
        capsys, "--model", str(ckpt), "--prompt", long_prompt, "--max-new-tokens", "3", "--crop"
    )
    assert rc == 0 and out.startswith(long_prompt)
    rc, _, err = sample_cli(capsys, "--model", str(ckpt), "--top-p", "0")
    assert rc == 2 and "top_p=0.0 must be in (0, 1]" in err
    rc, _, err = sample_cli(capsys, "--model", str(ckpt / "missing"))
    assert rc == 2 and "not found" in err


def test_cli_random_init_preset(capsys):
    args = ["--preset", "tiny", "--prompt", "Once upon a time", "--max-new-tokens", "5", "--seed", "3"]
    rc, out, _ = sample_cli(capsys, *args)
    assert rc == 0 and out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
    assert sample_cli(capsys, *args).out == out  # --seed also fixes the random initialisation


def test_decode_aware_layers_compile_to_the_stock_graph(model):
    list(
        decode_steps(model, PROMPT, SamplingParams(max_tokens=2, temperature=0))
    )  # the layers are decode-aware now
    assert isinstance(model.lm_head, DecodeLinear)
    x = torch.tensor([PROMPT])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: no graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, targets=x), model(x, targets=x), atol=1e-6, rtol=1e-6)
    Decoder(model).release()
