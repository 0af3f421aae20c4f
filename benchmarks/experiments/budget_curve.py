"""Validation CA against the recovery budget of the data-free default (issue 14, item 2's plot).

    PYTHONPATH=. python -m benchmarks.experiments.datafree_default --otbr-search \\
        --entries cifar10-badnets cifar10-clean \\
        --variants A-hints30-guard-shared J-b2560 J-b5120 J-b20480 J-b40960
    PYTHONPATH=. python -m benchmarks.experiments.budget_curve

Reads ``results/experiments/datafree_default.json`` (the default's first two stages run once per
model, then its recovery at each budget in sample-steps: images the student sees, each augmented
anew) and writes ``results/recover_budget_default.png``, ``.md`` and ``.json``: validation CA and ASR against
the budget, the recovery's wall time (1 thread; ``seconds``, measured in the same runs), and the
accuracy of OTBR's output (dashed), which guards the recovery and gives its hints.
"""

from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, read_json, write_report
from ccpurify.atomic import atomic_path
from ccpurify.passes.defaults import guarded_recover

# Budget (sample-steps) of each variant of benchmarks/experiments/datafree_default.py: the default's
# recovery (``defaults.shared_recover``) at 10,240 and the same at other budgets.
DEFAULT_BUDGET = guarded_recover().budget
BUDGETS = {
    "J-b2560": 2560,
    "J-b5120": 5120,
    "A-hints30-guard-shared": DEFAULT_BUDGET,
    "J-b20480": 20480,
    "J-b40960": 40960,
}


def curves(stored: dict) -> dict[str, list[dict]]:
    """Per model (``entry@macs-otbr-search`` rows): the measured budgets, smallest first."""
    found = {}
    for key, row in stored.items():
        if not key.endswith("-otbr-search"):
            continue
        points = [
            {"budget": budget, "ca": row[v]["val_ca"], "asr": row[v]["val_asr"], "seconds": row[v]["seconds"]}
            for v, budget in BUDGETS.items()
            if v in row
        ]
        if len(points) >= 3:
            found[key.removesuffix("-otbr-search")] = sorted(points, key=lambda p: p["budget"])
    return found


def otbr_alone(stored: dict) -> dict[str, float]:
    """Per model: the validation CA of OTBR's output, which guards the recovery and gives its hints."""
    return {
        key.removesuffix("-otbr-search"): row["otbr"]["val_ca"]
        for key, row in stored.items()
        if key.endswith("-otbr-search") and "otbr" in row
    }


def plot(found: dict[str, list[dict]], guards: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in found.items():
        line = ax.plot([p["budget"] for p in points], [100 * p["ca"] for p in points], marker="o", label=name)[0]
        if name in guards:
            ax.axhline(100 * guards[name], color=line.get_color(), ls="--", lw=1, label=f"{name}: OTBR alone")
        for p in points:
            asr = "" if p["asr"] is None else f"ASR {100 * p['asr']:.0f}%, "
            ax.annotate(
                f"{asr}{p['seconds']:.0f} s",
                (p["budget"], 100 * p["ca"]),
                textcoords="offset points",
                xytext=(4, -11),
                fontsize=7,
                color=line.get_color(),
            )
    ax.axvline(DEFAULT_BUDGET, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recovery budget, sample-steps (log scale; dotted: the default's)")
    ax.set_ylabel("validation CA % after the data-free default")
    ax.set_title("Data-free default: accuracy bought with distillation time (1 thread)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(RESULTS / "recover_budget_default.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def table(found: dict[str, list[dict]]) -> list[str]:
    budgets = sorted({p["budget"] for points in found.values() for p in points})
    lines = [
        "# Data-free default: validation CA / ASR % against the recovery budget",
        "",
        "The default's OTBR (ratio searched) and compensated pruning to 0.75 MACs run once per model; its "
        "recovery (`defaults.shared_recover`) then runs at each budget in sample-steps. Cells: validation "
        "CA / ASR %, the recovery's wall time at 1 thread (two or three jobs sharing the 2 cores).",
        "",
        "| model | " + " | ".join(f"{b:,}" + (" (default)" if b == DEFAULT_BUDGET else "") for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name, points in found.items():
        at = {p["budget"]: p for p in points}
        cells = []
        for b in budgets:
            p = at.get(b)
            asr = "" if p is None or p["asr"] is None else f" / {100 * p['asr']:.1f}"
            cells.append("-" if p is None else f"{100 * p['ca']:.1f}{asr}, {p['seconds']:.0f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![validation CA against budget](recover_budget_default.png)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    stored = read_json(RESULTS / "experiments" / "datafree_default.json", {})
    found = curves(stored)
    if not found:
        raise SystemExit("no budget variants in results/experiments/datafree_default.json yet: run the command above")
    plot(found, otbr_alone(stored))
    rows = [{"model": name, **p} for name, points in found.items() for p in points]
    write_report("recover_budget_default", rows, table(found), module="benchmarks.experiments.budget_curve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
