"""Draw docs/architecture.png: nanogpt's layers, top to bottom, as the import contract lists them.

    python scripts/draw_architecture.py            # rewrites docs/architecture.png

The layers are read from `[tool.importlinter]` in pyproject.toml when it is there, so the picture and
the contract cannot disagree; the one-line descriptions are this script's own.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "architecture.png"

# the contract's layers (pyproject.toml); used when pyproject.toml has no contract yet
LAYERS = [
    "cli",
    "commands",
    "export",
    "serve | bench | distill",
    "mlx",
    "infer",
    "train",
    "model",
    "kernels",
    "data",
    "folders",
    "config",
    "errors",
]
WHAT = {
    "cli": "nanogpt <command>: picks the module, prints a UserError as one line",
    "commands": "one module per command: flags, --backend choice, printing",
    "export": "Hugging Face folders (remote-code, gpt2), import, model card",
    "serve": "OpenAI-compatible server",
    "bench": "the card's benchmark table",
    "distill": "losses, local and API teachers",
    "mlx": "the same network, checkpoints, sampling, trainer in MLX",
    "infer": "sampling over the KV cache, sliding-window perplexity",
    "train": "loop, AdamW + schedule, checkpoints, torchrun, run log",
    "model": "the network and its KV cache; nothing else",
    "kernels": "fused head/loss, blocked attention, decode copies, device",
    "data": "tokenizer, sources, prepare, token shards",
    "folders": "which output folders a command may replace; run lock",
    "config": "ModelConfig, TrainConfig, presets (no torch)",
    "errors": "UserError, ArgumentParser, missing_extra",
}


def contract_layers() -> list[str]:
    """The layers of the pyproject contract, without the `nanogpt.` prefix; LAYERS if there is none."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        return LAYERS
    conf = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {}).get("importlinter", {})
    for contract in conf.get("contracts", []):
        if contract.get("type") == "layers":
            return [
                " | ".join(p.strip().removeprefix("nanogpt.") for p in layer.split("|"))
                for layer in contract["layers"]
            ]
    return LAYERS


def draw(layers: list[str], out: Path) -> None:
    row_h, gap, width = 0.62, 0.22, 10.0
    height = len(layers) * (row_h + gap)
    fig, ax = plt.subplots(figsize=(width, height * 0.72 + 0.6))
    ax.set_xlim(0, width)
    ax.set_ylim(-0.3, height + 0.1)
    ax.axis("off")
    tops = []
    for i, layer in enumerate(layers):
        y = height - (i + 1) * (row_h + gap) + gap
        names = [n.strip() for n in layer.split("|")]
        box_w = (width - 0.4 - 0.15 * (len(names) - 1)) / len(names)
        for j, name in enumerate(names):
            x = 0.2 + j * (box_w + 0.15)
            shade = "#dbe8f5" if name not in ("folders", "config", "errors") else "#eeeeee"
            ax.add_patch(
                FancyBboxPatch(
                    (x, y),
                    box_w,
                    row_h,
                    boxstyle="round,pad=0.02,rounding_size=0.08",
                    facecolor=shade,
                    edgecolor="#35618f",
                    linewidth=1.0,
                )
            )
            ax.text(x + 0.12, y + row_h * 0.62, name, fontsize=10.5, fontweight="bold", va="center")
            ax.text(
                x + 0.12,
                y + row_h * 0.26,
                WHAT.get(name, ""),
                fontsize=7.8 if len(names) == 1 else 7.2,
                va="center",
                color="#333333",
            )
        tops.append(y)
    for upper, lower in zip(
        tops, tops[1:], strict=False
    ):  # imports point down: a layer uses the ones below it
        ax.add_patch(
            FancyArrowPatch(
                (width - 0.45, upper),
                (width - 0.45, lower + row_h),
                arrowstyle="-|>",
                mutation_scale=9,
                color="#35618f",
                linewidth=0.9,
            )
        )
    ax.text(
        0.2,
        -0.2,
        "imports go down only (lint-imports); boxes on one row never import each other",
        fontsize=8,
        color="#555555",
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw(contract_layers(), OUT)
    print(OUT)
