"""What a trained network is used for: sampling as a generator over the KV cache and held-out perplexity.

`sampling.py` holds `SamplingParams`, the one description of a sampling request that the CLI, the server,
the MLX sampler and the distillation teacher share, and `sample_next`, the policy; `generate.py` holds
`decode_steps`/`generate`, the generators over the KV cache; `evaluate.py` the sliding-window perplexity
and bits per byte. Checkpoints are read through `nanogpt.train.checkpoint`.

    ids = list(generate(model, tok.encode("Once upon a time"), SamplingParams(max_tokens=100, seed=1337)))
"""
