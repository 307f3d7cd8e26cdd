"""NanoGPT for Hugging Face transformers (remote code, `trust_remote_code=True`).

Self-contained: imports torch and transformers only, never nanogpt, so an exported folder works on a
machine without nanogpt. The network is nanogpt's `model.py` with the transformers plumbing added
(`DynamicCache`, attention masks with left padding, `labels` -> loss, hidden states, attention weights,
activation checkpointing); module names and reprs are exactly the model card's tree, so `print(model)`
reproduces it and the state-dict keys are nanogpt's checkpoint keys. Works with transformers 4.46+ and 5.x.

The forward pass reads no tensor's values into Python (no `.item()`, `int()`, `bool()`), so
`torch.export`, the ONNX exporter and `torch.compile(fullgraph=True)` trace it whole; the one exception,
skipping the mask when an attention mask is all ones, happens only in eager mode.

    model = AutoModelForCausalLM.from_pretrained("path/to/export", trust_remote_code=True)
"""

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanogpt import NanoGPTConfig

try:  # transformers 5: init functions that skip weights already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4
    from torch.nn import init as _init

_V5 = int(transformers.__version__.split(".")[0]) >= 5
# Newer transformers (5.2x) renamed the cache argument and output field `past_key_values` -> `cache`;
# we accept both names and return the cache under the field this version's outputs have.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_logger = transformers.logging.get_logger(__name__)


class Linear(nn.Linear):
    """nn.Linear that prints as the model card does: `Linear(384, 1152)`."""

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that prints as the model card does: `LayerNorm((384,), eps=1e-05)`."""

    def extra_repr(self):
        return f"{tuple(self.normalized_shape)}, eps={self.eps}"


def eager_attention(q, k, v, mask, dropout):
    """softmax(q k^T / sqrt(hs)) v written out, returning the weights too: (B, nh, T, hs), (B, nh, T, S).

    The same causal rule as SDPA's `is_causal` when `mask` is None (no past then, so S == T).
    """
    T, S = q.size(-2), k.size(-2)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    scores = scores.masked_fill(~mask, float("-inf"))  # every query sees itself: no row is all -inf
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, dropout, training=dropout > 0)  # as SDPA's dropout_p, and GPT-2's eager path
    return weights @ v, weights


class NanoGPTAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: transformers sets `_attn_implementation` after __init__
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.dropout = config.dropout
        self.qkv_proj = Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out_proj = Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x, mask=None, cache=None, layer_idx=0):
        """x (B, T, C); mask None (plain causal, no past) or bool (B|1, 1, T, past + T), True = attend.

        Returns (y (B, T, C), attention weights (B, nh, T, past + T) with the eager implementation, else None).
        """
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # (B, nh, past + T, hs)
        dropout = self.dropout if self.training else 0.0
        if getattr(self.config, "_attn_implementation", None) == "eager":
            y, weights = eager_attention(q, k, v, mask, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
            )
            weights = None
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return F.dropout(self.out_proj(y), self.dropout, self.training), weights


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model with GELU (exact or tanh)."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dropout = config.dropout

    def forward(self, x):
        h = F.gelu(self.fc1(x), approximate=self.approximate)
        return F.dropout(self.fc2(h), self.dropout, self.training)


class NanoGPTBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_ln = config.norm_position == "pre"
        self.ln1 = LayerNorm(config.d_model, eps=config.ln_eps, bias=config.bias)
        self.attn = NanoGPTAttention(config)
        self.ln2 = LayerNorm(config.d_model, eps=config.ln_eps, bias=config.bias)
        self.ff = FeedForward(config)

    def forward(self, x, mask=None, cache=None, layer_idx=0):
        """-> (x, the attention weights or None)."""
        if self.pre_ln:  # x + f(ln(x)), the GPT-2 block
            a, weights = self.attn(self.ln1(x), mask, cache, layer_idx)
            x = x + a
            return x + self.ff(self.ln2(x)), weights
        a, weights = self.attn(x, mask, cache, layer_idx)
        x = self.ln1(x + a)  # ln(x + f(x))
        return self.ln2(x + self.ff(x)), weights


class NanoGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["NanoGPTBlock"]
    supports_gradient_checkpointing = True  # NanoGPTModel runs each block through the checkpoint function
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4: generate() hands us a DynamicCache

    def _init_weights(self, module):
        # GPT-2 init (used for missing weights and from_config); residual projections are scaled
        # by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if module in self._residual_projections():
                std = 0.02 / math.sqrt(2 * self.config.n_layers)
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            if module.bias is not None:
                _init.zeros_(module.bias)

    def _residual_projections(self):
        return {m for name, m in self.named_modules() if name.endswith(("attn.out_proj", "ff.fc2"))}


def _cache_length(cache):
    return cache.get_seq_length() if cache is not None else 0


def _eager():
    """Not being traced: torch.compile, torch.export (and so the ONNX exporter) or torch.jit.trace."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def build_mask(attention_mask, past, T, device):
    """Causal mask over past + T keys, with padded keys (attention_mask == 0) hidden: bool (B|1, 1, T, past+T).

    Every query also sees itself, so a padding query (all of whose keys are padding) gets a finite
    output instead of NaN; real tokens never see padding, so this changes nothing they compute.
    """
    S = past + T
    q_pos = past + torch.arange(T, device=device)  # (T,) absolute position of each query
    k_pos = torch.arange(S, device=device)  # (S,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    mask = causal[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keep = attention_mask[:, -S:].to(torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        mask = (mask & keep) | (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask


class NanoGPTModel(NanoGPTPreTrainedModel):
    """Embeddings, the blocks and the final LayerNorm: token ids (B, T) -> hidden states (B, T, d_model)."""

    def __init__(self, config):
        super().__init__(config)
        self.dropout = config.dropout
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(NanoGPTBlock(config) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, eps=config.ln_eps, bias=config.bias)
        # set by transformers' gradient_checkpointing_enable() with `_gradient_checkpointing_func`
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.token_embedding

    def set_input_embeddings(self, value):
        self.token_embedding = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        checkpointing = self.gradient_checkpointing and self.training
        use_cache, output_attentions, output_hidden_states = self._output_options(
            use_cache, output_attentions, output_hidden_states, checkpointing
        )
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        B, T, _ = inputs_embeds.shape
        cache = _open_cache(cache, use_cache)
        past = _cache_length(cache)
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, T, device)
        # No padding and no past: the plain causal kernel, exactly as nanogpt's model.py computes it. Whether a
        # mask is all ones is a value, so a traced or compiled graph always takes the general path.
        plain = past == 0 and (attention_mask is None or (_eager() and bool(attention_mask.all())))
        mask = None if plain else build_mask(attention_mask, past, T, device)
        x = inputs_embeds + self.position_embedding(position_ids)  # (B, T, C)
        x = F.dropout(x, self.dropout, self.training)
        x, hidden, attentions = self._blocks(
            x, mask, cache, checkpointing, output_hidden_states, output_attentions
        )
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **{_CACHE_FIELD: cache},
        )
        return out if return_dict is not False else out.to_tuple()

    def _output_options(self, use_cache, output_attentions, output_hidden_states, checkpointing):
        """use_cache, output_attentions, output_hidden_states: the call's, else the config's; refused where
        they cannot hold."""
        if checkpointing and use_cache:  # a recomputed block would write its keys into the cache twice
            _logger.warning_once("use_cache=True does not work with gradient checkpointing; the cache is off")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        use_cache = use_cache and not checkpointing
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        implementation = getattr(self.config, "_attn_implementation", None)
        # SDPA never forms the weights: refuse, rather than return attentions=None
        if output_attentions and implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs the eager attention, not {implementation!r}; load the model with "
                'attn_implementation="eager"'
            )
        return use_cache, output_attentions, output_hidden_states

    def _positions(self, attention_mask, past, T, device):
        """Position ids (B|1, T) of the new tokens: after the past, or with a mask, counting real tokens only.

        Our positions are at most past + T - 1 (with a mask: the count of real tokens before each, which the
        mask's width bounds), so the shapes alone check them: nothing read back from the device, and tracers
        see a bound on sizes. Positions the caller passes are the caller's to keep in range.
        """
        if past + T > self.config.context_length:
            raise ValueError(
                f"{past + T} positions (past tokens, padding included, plus new ones) exceed the context of "
                f"{self.config.context_length} tokens; use a shorter prompt or max_length"
            )
        if attention_mask is not None:  # left padding: a row's first real token is position 0
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        return torch.arange(past, past + T, device=device)[None]

    def _blocks(self, x, mask, cache, checkpointing, output_hidden_states, output_attentions):
        """The blocks, then ln_f: (B, T, C) -> (B, T, C), with each block's input and attention weights when
        asked (GPT-2's hidden states: the embeddings, then each block's output, the last after ln_f)."""
        hidden, attentions = [], []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                hidden.append(x)
            if checkpointing:  # the block's activations are recomputed in the backward pass
                x, weights = self._gradient_checkpointing_func(block.__call__, x, mask, None, i)
            else:
                x, weights = block(x, mask, cache, i)
            if output_attentions:
                attentions.append(weights)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        return x, hidden, attentions


def _open_cache(cache, use_cache):
    """The cache this call writes to: a new DynamicCache, the caller's (a legacy tuple converted), or None."""
    if not use_cache:
        return None
    if cache is None:
        return DynamicCache()
    if isinstance(cache, (tuple, list)):  # legacy tuple cache (transformers 4)
        return DynamicCache.from_legacy_cache(cache)
    return cache


def causal_lm_loss(logits, labels, num_items_in_batch=None, shift_labels=None):
    """Next-token cross-entropy in fp32: position t predicts labels[t + 1] (or shift_labels[t]); -100 is ignored.

    The mean over counted tokens, or their sum / num_items_in_batch when given: transformers' causal-LM rule.
    """
    if shift_labels is None:
        logits, shift_labels = logits[:, :-1], labels[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=-100,
        reduction=reduction,
    )
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


class NanoGPTLMHeadModel(NanoGPTPreTrainedModel, GenerationMixin):
    # the tied head: a {target: source} dict in transformers 5, a list of targets in 4
    _tied_weights_keys = (
        {"lm_head.weight": "transformer.token_embedding.weight"} if _V5 else ["lm_head.weight"]
    )
    # forward takes `num_items_in_batch` (from **kwargs): the Trainer then leaves gradient accumulation's
    # normalisation to the loss, as it does for transformers' own causal LMs
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.transformer = NanoGPTModel(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        # transformers derives this from class names ending in "ForCausalLM"; ours is GPT-2's name. The Trainer
        # reads it to count the tokens a shifted causal loss sees (labels[:, 1:]) for `num_items_in_batch`.
        self.loss_type = "ForCausalLM"
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.token_embedding

    def set_input_embeddings(self, value):
        self.transformer.token_embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        """input_ids (B, T) -> logits (B, T, vocab_size); with a cache, input_ids holds only the new tokens.

        `labels` -> the next-token loss, the mean over tokens whose label is not -100; with
        `num_items_in_batch` (the Trainer's count over all gradient-accumulation micro-batches), the sum over
        this batch divided by it, so that the micro-batches' losses add up to the mean over all of them.
        """
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache=cache if cache is not None else past_key_values,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, kwargs.get("shift_labels"))
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, cache=None, **kwargs
    ):
        """Feed only the tokens the cache has not seen; the mask covers past + new tokens."""
        name, value = ("cache", cache) if cache is not None else ("past_key_values", past_key_values)
        if isinstance(value, Cache) and value.get_seq_length() > 0:
            input_ids = input_ids[:, value.get_seq_length() :]
        if value is None:  # a fresh generate() call: transformers 5.2x+ passes `cache`
            name = _CACHE_FIELD
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": kwargs.get("use_cache", True),
            name: value,
        }
        # transformers 5 hands generate()'s output flags to this method, 4 adds them to its result itself
        for flag in ("output_attentions", "output_hidden_states"):
            if flag in kwargs:
                inputs[flag] = kwargs[flag]
        return inputs
