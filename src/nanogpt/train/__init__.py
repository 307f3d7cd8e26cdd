"""Training: the loop (`loop.py`: accumulation, eval, exact resume, DDP), AdamW and the schedule (`optim.py`),
checkpoints in safetensors (`checkpoint.py`), torchrun setup (`distributed.py`) and the run log (`plot.py`).
A run folder is `config.json` + `train_config.json` + `log.jsonl` + `loss.png` + `last/` and `best/`.

    result = train(preset("tiny"), TrainConfig(max_iters=200), "data/builtin", "runs/tiny")  # from .loop
"""
