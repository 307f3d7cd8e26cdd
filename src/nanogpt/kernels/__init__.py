"""What makes the network fast on each device: the fused head + loss and blocked attention (`ops.py`), and
the weight copies used by one-token decode steps (`decode.py`). Nothing outside imports their internals.
"""
