import math

import pytest
import torch
import torch.nn.functional as F

from nanogpt.config import preset
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache
from tests.card import CARD_TREE
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def card_model():
    return NanoGPTLMHeadModel(preset("card"))


def test_card_tree_and_counts(card_model):
    assert str(card_model) == CARD_TREE
    assert card_model.num_params(unique=False) == 52_990_464
    assert card_model.num_params(unique=True) == 33_691_776
    assert card_model.lm_head.weight is card_model.transformer.token_embedding.weight
    assert card_model.lm_head.bias is None


def test_init_matches_gpt2(card_model):
    sd = dict(card_model.named_parameters())
    assert sd["transformer.blocks.0.attn.qkv_proj.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert sd["transformer.blocks.3.ff.fc2.weight"].std().item() == pytest.approx(scaled, rel=0.02)
    assert sd["transformer.blocks.3.attn.out_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert sd["transformer.blocks.0.attn.qkv_proj.bias"].abs().max().item() == 0.0


def _reference_block(block, x, pre: bool):
    """The block written out with explicit attention math, independent of SDPA."""
    B, T, C = x.shape
    nh = block.attn.n_heads

    def attn(h):
        q, k, v = block.attn.qkv_proj(h).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return block.attn.out_proj((att @ v).transpose(1, 2).reshape(B, T, C))

    def ff(h):
        return block.ff.fc2(0.5 * block.ff.fc1(h) * (1 + torch.erf(block.ff.fc1(h) / math.sqrt(2))))

    if pre:
        x = x + attn(block.ln1(x))
        return x + ff(block.ln2(x))
    x = block.ln1(x + attn(x))
    return block.ln2(x + ff(x))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_forward_matches_reference(norm):
    cfg = tiny_config(norm_position=norm)
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    tr = model.transformer
    x = tr.token_embedding(idx) + tr.position_embedding(torch.arange(10))
    for block in tr.blocks:
        x = _reference_block(block, x, pre=norm == "pre")
    expected = tr.ln_f(x) @ tr.token_embedding.weight.T
    torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)


def test_pre_and_post_differ(tiny_cfg):
    torch.manual_seed(0)
    pre = NanoGPTLMHeadModel(tiny_cfg).eval()
    post = NanoGPTLMHeadModel(tiny_config(norm_position="post")).eval()
    post.load_state_dict(pre.state_dict())
    idx = torch.randint(0, 50257, (1, 8))
    assert not torch.allclose(pre(idx), post(idx))


def test_causality(tiny_cfg):
    model = NanoGPTLMHeadModel(tiny_cfg).eval()
    a = torch.randint(0, 50257, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 50257
    torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8])
    assert not torch.allclose(model(a)[:, 8:], model(b)[:, 8:])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_cached_equals_uncached(norm):
    cfg = tiny_config(norm_position=norm)
    torch.manual_seed(1)
    model = NanoGPTLMHeadModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache.for_model(cfg, batch_size=2)
    parts = [model(idx[:, :7], cache=cache), model(idx[:, 7:12], cache=cache)]  # prefill, then a chunk
    parts += [model(idx[:, t : t + 1], cache=cache) for t in range(12, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20


def test_context_overflow_raises(tiny_cfg):
    model = NanoGPTLMHeadModel(tiny_cfg)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long))


def test_dropout_only_in_training():
    cfg = tiny_config(dropout=0.5)
    model = NanoGPTLMHeadModel(cfg)
    idx = torch.randint(0, 50257, (1, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_untied_and_biasless():
    cfg = tiny_config(tie_embeddings=False, bias=False)
    model = NanoGPTLMHeadModel(cfg)
    assert model.lm_head.weight is not model.transformer.token_embedding.weight
    assert model.num_params(unique=False) == model.num_params(unique=True)
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())


def test_loss_at_init_near_uniform(tiny_cfg):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_cfg).eval()
    idx, targets = torch.randint(0, 50257, (2, 4, 32))  # targets unrelated to inputs (tied weights)
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(50257)) < 0.2


def test_last_only_gives_the_last_position_logits(tiny_cfg):
    torch.manual_seed(1)
    model = NanoGPTLMHeadModel(tiny_cfg).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    full = model(idx)
    torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
    cache = KVCache.for_model(tiny_cfg, batch_size=2)
    model(idx[:, :8], cache=cache, last_only=True)
    torch.testing.assert_close(
        model(idx[:, 8:], cache=cache, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5
    )
