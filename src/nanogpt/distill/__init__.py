"""Knowledge distillation: the losses and local teachers (`losses.py`), API teachers (`api.py`: top-k logprobs
and chat data) and their HTTP client with its answer cache (`client.py`).
"""
