"""The card's benchmark table, measured: the run and its report (`run.py`), measurement helpers
(`measure.py`) and the workloads of ours and Hugging Face's models (`workloads.py`). Figures measured
with it are in docs/benchmarks.md.

    nanogpt bench --preset card --peers
"""
