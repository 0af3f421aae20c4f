"""Does OTBR's output have stale BatchNorm statistics, and would repairing them help (issue 14, item 1)?

    python -m benchmarks.experiments.otbr_statistics

After OTBR (in place and compact) on CIFAR-10 BadNets and WaNet, each BatchNorm's running statistics
are re-derived from the *suspect's* statistics with ``gaussian_compensation`` (what the defense's
weight edits changed, measured on Gaussian inputs matching the suspect's statistics), and the same
is done after global pruning to 0.75 MACs. Validation CA / ASR of each. The finding (first run,
2026-12-01): the repair raises CA but brings the backdoor back (in-place OTBR on BadNets: 80.0 / 0.1
-> 86.8 / 92.3), so part of OTBR's effect lives in statistics that no longer match its weights, and
compensation must be measured against the defended model, not the suspect.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from benchmarks.common import RESULTS, context_for, load_entry
from ccpurify.compensate import gaussian_compensation
from ccpurify.distill import channel_correspondence
from ccpurify.passes import OTBR, Prune


def score(entry, model) -> list[float]:
    m = entry.val.score(model).metrics
    return [m.ca, m.asr]


def against_suspect(entry, model):
    """``model`` with its BatchNorm statistics re-derived from the suspect's (a copy)."""
    out = copy.deepcopy(model)
    gaussian_compensation(
        out, entry.model, channel_correspondence(entry.model, out, entry.example_inputs), entry.example_inputs
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", nargs="+", default=["cifar10-badnets", "cifar10-wanet"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for name in args.entries:
        entry = load_entry(name)
        context = context_for(entry, "none")
        for compact in (False, True):
            defended, _ = OTBR(compact=compact)(entry.model, context)
            pruned, _ = Prune(macs=0.75, round_to=8, global_pruning=True)(defended, context)
            row = {
                "otbr": score(entry, defended),
                "otbr, statistics from the suspect": score(entry, against_suspect(entry, defended)),
                "otbr + prune, compensated against the suspect": score(entry, against_suspect(entry, pruned)),
            }
            rows[f"{name} {'compact' if compact else 'in place'}"] = row
            print(name, compact, row, flush=True)
    out = RESULTS / "experiments" / "otbr_statistics.json"
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
