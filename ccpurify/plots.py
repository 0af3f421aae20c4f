"""Pictures of one purification (``ccpurify purify --plot``, the demo): clean accuracy and attack
success before and after, how much of each layer the purified model keeps, and the latency
distribution of the two ONNX files measured interleaved. Drawn with matplotlib's Agg backend
(no display needed), written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from ccpurify.atomic import atomic_path


def layer_weights_kept(original: nn.Module, purified: nn.Module) -> list[tuple[str, float]]:
    """For every Conv2d and Linear of ``original``, in order, the fraction of its weights kept by the
    module of the same name in ``purified`` (pruned channels shrink it; a factorized layer counts its
    factors, so a low rank shows as a small fraction). Layers the purified model lacks are left out."""
    modules = dict(purified.named_modules())
    kept = []
    for name, layer in original.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name in modules:
            after = sum(p.numel() for n, p in modules[name].named_parameters() if n.rpartition(".")[2] == "weight")
            kept.append((name, after / layer.weight.numel()))
    return kept


def purification_figure(
    path: str | os.PathLike,
    title: str,
    scores: Mapping[str, tuple[float | None, float | None]] | None = None,
    kept: Sequence[tuple[str, float]] | None = None,
    latency_ms: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One PNG with a panel per given part: ``scores`` (label -> (CA, ASR) as fractions; None where
    not measured), ``kept`` (``layer_weights_kept``) and ``latency_ms`` (label -> timed runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("scores", "kept", "latency") if {"scores": scores, "kept": kept, "latency": latency_ms}[p]]
    if not panels:
        raise ValueError("nothing to draw: give scores, kept or latency_ms")
    widths = {"scores": 1.0, "kept": 2.2, "latency": 1.2}
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.2 * sum(widths[p] for p in panels), 4.2),
        gridspec_kw={"width_ratios": [widths[p] for p in panels]},
        squeeze=False,
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "scores":
            labels = list(scores)
            for offset, (metric, index, color) in enumerate((("CA", 0, "tab:blue"), ("ASR", 1, "tab:red"))):
                values = [100 * (scores[k][index] or 0.0) for k in labels]
                bars = ax.bar(
                    [i + 0.38 * (offset - 0.5) for i in range(len(labels))], values, 0.36, label=metric, color=color
                )
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_ylim(0, 110)
            ax.set_ylabel("%")
            ax.set_title("clean accuracy and attack success")
            ax.legend(fontsize=8)
        elif panel == "kept":
            names, fractions = zip(*kept, strict=True)
            ax.bar(range(len(names)), [100 * f for f in fractions], color="tab:green")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_ylim(0, 105)
            ax.set_ylabel("weights kept (%)")
            ax.set_title("per layer: weights the purified model keeps")
        else:
            labels = list(latency_ms)
            ax.boxplot([list(latency_ms[k]) for k in labels], showfliers=False)
            ax.set_xticks(range(1, len(labels) + 1), labels)
            ax.set_ylabel("ms per run (batch 1, 1 thread)")
            ax.set_title("onnxruntime latency, interleaved runs")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
