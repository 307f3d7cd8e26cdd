"""Knowledge distillation: the losses (`losses.py`), local teachers (`local.py`), API teachers (`api.py`: top-k
logprobs and chat data) with their HTTP client and answer cache (`client.py`), and the teacher SPEC with the
trainer's loss for each kind (`teachers.py`).
"""
