"""The card's benchmark table, measured: the run and its report (`run.py`), measurement helpers
(`measure.py`) and the workloads of ours and Hugging Face's models (`workloads.py`). Figures measured
with it are in docs/benchmarks.md. `bench --serve` load-tests `nanogpt serve` over HTTP (`loadgen.py`,
`serving.py`; docs/serving.md).

    nanogpt bench --preset card --peers
    nanogpt bench --serve --preset card
"""
