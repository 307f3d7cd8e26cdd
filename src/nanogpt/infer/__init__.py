"""What a trained network is used for: sampling as a generator over the KV cache (`generate.py`:
`sample_next`, `decode_steps`, `generate`) and held-out perplexity and bits per byte with a sliding
window (`evaluate.py`). Checkpoints are read through `nanogpt.train.checkpoint`.

    ids = list(generate(model, tok.encode("Once upon a time"), 100, temperature=0.8, seed=1337))
"""
