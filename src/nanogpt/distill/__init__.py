"""Knowledge distillation, the card's second stage: the losses (`losses.py`), same-vocabulary local teachers
(`local.py`), local teachers of any vocabulary (`crossvocab.py`, with the ULD path in `uld.py`), the
sequence-level data shared by text-writing teachers (`sequence.py`), API teachers (`api.py`: top-k logprobs and
chat data) with their HTTP client, answer cache and key redaction (`client.py`), and the teacher SPEC with the
trainer's loss for each kind (`teachers.py`). Training itself is `nanogpt.train.loop.train` with a distillation
`loss_fn`.

    nanogpt distill --student runs/base --teacher runs/big --data data/builtin --out runs/kd
"""
