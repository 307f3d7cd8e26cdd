"""Text to tokens: the offline GPT-2 tokenizer, document sources (builtin corpus, text/JSONL/Parquet, HF
datasets), `prepare` (documents -> token shards, restartable) and the shard format with its batch sampler.
"""
