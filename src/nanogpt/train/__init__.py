"""Training: the loop (`loop.py`: accumulation, eval, exact resume, DDP), AdamW and the schedule (`optim.py`),
checkpoints in safetensors (`checkpoint.py`), torchrun setup (`distributed.py`) and the run log (`plot.py`).
"""
