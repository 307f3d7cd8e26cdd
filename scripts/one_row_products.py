"""The card's one-row weight products alone, in sequence, read from memory: what they cost without the step.

    python scripts/one_row_products.py [--threads 2] [--preset card] [--passes 15]

A decode step of the card's model multiplies one row by 33 weights (4 per block, 8 blocks, and the tied head):
129 MiB in fp32. This runs exactly those products back to back, in each layout a decoder could use, with a
64 MiB write between passes so no weight is still in cache, and prints the fastest and median pass as GB/s of
weights read, beside the copy bandwidth the bench's bound uses (`bench.measure.copy_bandwidth`). The
products' time alone is a floor under the step: the rest of a step (attention, norms, sampling) adds to it.
Results: docs/benchmarks.md, "Compiled decode".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanogpt.bench.measure import copy_bandwidth
from nanogpt.config import preset
from nanogpt.kernels.decode import _split_columns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="card")
    p.add_argument("--passes", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    d, f = cfg.d_model, cfg.d_ff
    shapes = [(3 * d, d), (d, d), (f, d), (d, f)] * cfg.n_layers + [(cfg.vocab_size, d)]  # (out, in)
    weights = [torch.randn(*s) for s in shapes]
    mib = sum(w.numel() * 4 for w in weights) / 2**20
    rows = {d: torch.randn(1, d) for d in {s[1] for s in shapes}}
    blocks = a.threads
    # layout -> (the weights in it, one row times one of them)
    layouts: dict[str, tuple[list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
        "F.linear, (out, in)": (list(weights), lambda w: F.linear(rows[w.size(1)], w)),
        "x @ W, (in, out)": ([w.t().contiguous() for w in weights], lambda w: rows[w.size(0)] @ w),
        f"bmm, {blocks} column blocks (the decoder's fp32 copies)": (
            [_split_columns(w.t(), blocks) for w in weights],
            lambda w: torch.bmm(rows[w.size(1)].reshape(1, 1, -1).expand(blocks, -1, -1), w),
        ),
    }
    flush = torch.empty(64 * 2**20 // 4)
    gb = mib * 2**20 / 1e9

    print(f"{a.preset}: {len(shapes)} one-row products, {mib:.1f} MiB of fp32 weights, {a.threads} thread(s)")
    for name, (laid_out, product) in layouts.items():
        times = []
        for _ in range(a.passes):
            flush.add_(1)  # evict the weights: every pass reads them from memory
            t = time.perf_counter()
            for w in laid_out:
                product(w)
            times.append(time.perf_counter() - t)
        best, median = min(times), statistics.median(times)
        print(
            f"{name}: best {best * 1e3:.2f} ms = {gb / best:.1f} GB/s, median {median * 1e3:.2f} ms = {gb / median:.1f} GB/s"
        )
    copy = copy_bandwidth(torch.device("cpu"), 5)
    print(f"copy bandwidth (the bench's: read + write, 256 MiB, fastest of 5): {copy:.1f} GB/s")


if __name__ == "__main__":
    main()
