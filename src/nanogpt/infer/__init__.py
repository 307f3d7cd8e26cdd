"""What a trained network is used for: sampling as a generator over the KV cache (`generate.py`) and
held-out perplexity with a sliding window (`evaluate.py`).
"""
