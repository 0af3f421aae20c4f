"""Copy the benchmark tables from benchmarks/results/ into README.md (between the results markers).

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results"


def results_section() -> str:
    parts = []
    summary_file = RESULTS / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        lines = ["### Headline (mean over attacks, test split; MACs and latency ratios purified / undefended)", "",
                 "| dataset | defense | attacks | mean DER % | mean CA drop pt | max ASR % | CA drop on the clean model pt | MACs | latency b1/t1 |",
                 "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for dataset, per_defense in summary["per_dataset"].items():
            for d, s in per_defense.items():
                lat, clean = s.get("mean_latency_ratio_bs1_t1"), s.get("clean_model_ca_drop_test")
                lines.append(f"| {dataset} | {d} | {s['attacks']} | {100 * s['mean_der_test']:.1f} | {100 * s['mean_ca_drop_test']:.1f} | "
                             f"{100 * s['max_asr_test']:.1f} | {'-' if clean is None else f'{100 * clean:.1f}'} | "
                             f"{s['mean_macs_ratio']:.2f} | {'-' if lat is None else f'{lat:.2f}'} |")  # fmt: skip
        lines += ["", "Outside reference: the BackdoorBench leaderboard's CLP row has a mean DER of about 59 on CIFAR-10 "
                  "(PreAct-ResNet18, full width, 100 epochs; different triggers and scale, so a sanity band only).",
                  "", f"Defaults (`ccpurify purify` with no method): {summary['defaults']}."]  # fmt: skip
        parts.append("\n".join(lines))
    for name in ("default_selection.md", "cifar10.md", "gtsrb.md", "compactness.md", "defenses.md", "cc_ablation.md"):
        path = RESULTS / name
        if path.is_file():
            text = path.read_text().strip()
            parts.append(re.sub(r"^#{1,2} ", "### ", text, flags=re.M))
    if (RESULTS / "asr_vs_macs.png").is_file():
        parts.append("![ASR against MACs](benchmarks/results/asr_vs_macs.png)")
    return "\n\n".join(parts) if parts else "No results yet: run `python benchmarks/grid.py`."


def main() -> int:
    text = README.read_text()
    new = re.sub(r"(<!-- results:start -->\n).*?(\n<!-- results:end -->)", lambda m: m.group(1) + results_section() + m.group(2),
                 text, flags=re.S)  # fmt: skip
    README.write_text(new)
    print("README.md results section updated" if new != text else "README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
