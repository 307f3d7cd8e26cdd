"""Knowledge distillation, the card's second stage: the losses and local teachers (`losses.py`), API
teachers (`api.py`: top-k logprobs and chat data) and their HTTP client with its answer cache and key
redaction (`client.py`). Training itself is `nanogpt.train.loop.train` with a distillation `loss_fn`.

    nanogpt distill --student runs/base --teacher runs/big --data data/builtin --out runs/kd
"""
