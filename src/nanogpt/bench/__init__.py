"""The card's benchmark table, measured: the run and its report (`run.py`), the table's rows as data
(`table.py`: a `Workload` per timed measurement), how they are timed (`measure.py`) and what each model runs
(`workloads.py`: a `Runner` for ours and for Hugging Face's GPT-2). Figures measured with it are in
docs/benchmarks.md. `bench --serve` load-tests `nanogpt serve` over HTTP (`loadgen.py`,
`serving.py`; docs/serving.md).

    nanogpt bench --preset card --peers
    nanogpt bench --serve --preset card
"""
