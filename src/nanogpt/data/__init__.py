"""Text to tokens: the offline GPT-2 tokenizer (`tokenizer.py`), document sources (`sources.py`: the
builtin corpus, text/JSONL/Parquet, HF datasets), `nanogpt prepare` (`prepare.py`: documents -> token
shards, restartable) and the shard format with its random-window batch sampler (`shards.py`).

    tok = get_tokenizer(); data = TokenData("data/builtin")   # from .tokenizer and .shards
"""
