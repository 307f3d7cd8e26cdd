"""NanoGPT configuration for Hugging Face transformers (remote code, `trust_remote_code=True`).

Self-contained: imports transformers only, never nanogpt. The field names are nanogpt's `ModelConfig`
names; `attribute_map` gives transformers the standard names it looks for (caches size themselves
from `num_hidden_layers`, generation reads `max_position_embeddings`).

    config = AutoConfig.from_pretrained("path/to/export", trust_remote_code=True)
"""

from transformers import PretrainedConfig


class NanoGPTConfig(PretrainedConfig):
    model_type = "nanogpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_hidden_layers": "n_layers",
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "context_length",
        "intermediate_size": "d_ff",
    }

    def __init__(
        self,
        vocab_size=50257,
        d_model=384,
        n_layers=8,
        n_heads=8,
        d_ff=1536,
        context_length=512,
        dropout=0.1,
        bias=True,
        tie_embeddings=True,
        ln_eps=1e-5,
        norm_position="pre",  # "pre": x + f(ln(x)) (GPT-2); "post": ln(x + f(x)) (BERT)
        activation="gelu",  # "gelu" (exact erf) or "gelu_tanh" (GPT-2's tanh approximation)
        use_cache=True,
        bos_token_id=50256,
        eos_token_id=50256,
        **kwargs,
    ):
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position={norm_position!r} is unknown; use 'pre' or 'post'")
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation={activation!r} is unknown; use 'gelu' or 'gelu_tanh'")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.context_length = context_length
        self.dropout = dropout
        self.bias = bias
        self.tie_embeddings = tie_embeddings
        self.ln_eps = ln_eps
        self.norm_position = norm_position
        self.activation = activation
        self.use_cache = use_cache
        # transformers ties lm_head to the token embedding when this is set (both 4.x and 5.x)
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
