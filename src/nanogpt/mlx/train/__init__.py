"""MLX training, file for file the twin of `nanogpt.train`: the loop (`loop.py`: accumulation, eval, exact
resume), AdamW, clipping and the `mx.compile`d step (`optim.py`), checkpoints in the shared safetensors format
plus the MLX optimizer state (`checkpoint.py`). The schedule, the run folder and `TrainResult`/`Counters` are
the PyTorch side's own; a run folder is the same `config.json` + `train_config.json` + `log.jsonl` +
`loss.png` + `last/` and `best/`.

    result = train(preset("tiny"), TrainConfig(max_iters=200), "data/builtin", "runs/mlx-tiny")  # from .loop
"""
