"""Train (or verify) the benchmark zoo: backdoored models for every dataset x attack, plus clean ones.

    python -m benchmarks.zoo                       # train what is missing, cpu preset, into benchmarks/zoo/
    python -m benchmarks.zoo --only cifar10-wanet  # one entry
    python -m benchmarks.zoo --preset paper --device cuda --out runs/zoo-paper
    python -m benchmarks.zoo --verify              # check the committed weights against zoo/SHA256SUMS

Each entry is a run directory (manifest.json, metrics.json, model.safetensors, attack recipe,
poison indices, defender subsets). Finished entries are skipped, interrupted ones resume.
After training, ``zoo/SHA256SUMS`` and ``zoo/README.md`` (the table of entries) are rewritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from ccpurify.atomic import write_text
from ccpurify.progress import ProgressEvent
from ccpurify.train import preset_config, train

HERE = Path(__file__).resolve().parent
# The cpu preset's PreAct-ResNet18 x0.25 on every dataset x attack.
ENTRIES: list[tuple[str, str | None, str | None]] = [
    (dataset, attack, None)
    for dataset, attacks in (
        ("cifar10", ("badnets", "blended", "wanet", "sig", "lf", "input_aware", None)),
        ("gtsrb", ("badnets", "blended", "wanet", "lf", "input_aware", None)),
    )
    for attack in attacks
]

# Other architecture families, so that a default chosen on one network is tested on others: a plain
# VGG at half width (its first stage keeps 32 channels, so MACs targets between 0.75 and 1.0 can be
# expressed with round_to=8) and a depthwise MobileNetV2. Training overrides of the cpu preset:
# VGG-16-BN x0.5 costs ~330 s per CIFAR-10 epoch on 2 cores and converges in 10 one-cycle epochs.
ARCHS: dict[str, dict] = {
    "vgg16_bn": dict(arch="vgg16_bn", width=0.5, epochs=10),
    "mobilenet_v2": dict(arch="mobilenet_v2", width=0.25),
}
ENTRIES += [("cifar10", attack, arch) for arch in ARCHS for attack in ("badnets", "blended", "wanet")]


def entry_name(dataset: str, attack: str | None, arch: str | None = None) -> str:
    """``cifar10-badnets`` for the preset's PreAct-ResNet18, ``cifar10-vgg16_bn-badnets`` for others."""
    return f"{dataset}-{arch + '-' if arch else ''}{attack or 'clean'}"


def log_progress(event: ProgressEvent) -> None:
    if event.total and event.step == event.total:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in event.metrics.items())
        print(f"{time.strftime('%H:%M:%S')} {event.task} {metrics}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index(out: Path) -> None:
    """SHA256SUMS of every committed file and a Markdown table of the entries."""
    sums, rows = [], []
    for d in sorted(p for p in out.iterdir() if (p / "manifest.json").is_file()):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.name != "checkpoint.pt":
                sums.append(f"{sha256(f)}  {d.name}/{f.name}")
        m = json.loads((d / "manifest.json").read_text())
        c, met = m["config"], m["metrics"]
        asr = "-" if met["asr"] is None else f"{100 * met['asr']:.2f}"
        rows.append(
            f"| {d.name} | {c['arch']} x{c['width']} | {c['epochs']} | {100 * met['ca']:.2f} | {asr} | "
            f"{met['params']:,} | {met['macs']:,} | {m['wall_time_s'] / 60:.1f} |"
        )
    write_text(out / "SHA256SUMS", "\n".join(sums) + "\n")
    header = (
        "| entry | arch | epochs | CA % | ASR % | params | MACs | train minutes |\n|---|---|---|---|---|---|---|---|"
    )
    write_text(
        out / "README.md",
        "# Benchmark zoo\n\nTrained by `python -m benchmarks.zoo` "
        "(preset and recipe in each entry's manifest.json).\n\n" + header + "\n" + "\n".join(rows) + "\n",
    )


def verify(out: Path) -> int:
    bad = 0
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = out / name
        if not path.is_file() or sha256(path) != digest:
            print(f"MISMATCH {name}")
            bad += 1
    print("zoo verified" if not bad else f"{bad} files differ from SHA256SUMS")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="training preset (default: cpu)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", default=str(HERE / "zoo"), help="zoo folder (default: benchmarks/zoo)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="entry names to train, e.g. cifar10-badnets gtsrb-clean"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every entry (default: 0)")
    parser.add_argument("--data", default=None, help="dataset location (default: $CCPURIFY_DATA, then ../shared/data)")
    parser.add_argument("--verify", action="store_true", help="only check the committed files against SHA256SUMS")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.verify:
        return verify(out)
    names = {entry_name(*e) for e in ENTRIES}
    if args.only and not set(args.only) <= names:
        parser.error(f"unknown entries {sorted(set(args.only) - names)}; known: {sorted(names)}")
    for dataset, attack, arch in ENTRIES:
        name = entry_name(dataset, attack, arch)
        if args.only and name not in args.only:
            continue
        run_dir = out / name
        if (run_dir / "manifest.json").is_file():
            print(f"{name}: done, skipped")
            continue
        overrides = ARCHS[arch] if arch else {}
        config = preset_config(args.preset, dataset, attack, seed=args.seed, device=args.device, **overrides)
        print(
            f"{time.strftime('%H:%M:%S')} {name}: training ({config.epochs} epochs, width {config.width})", flush=True
        )
        result = train(config, run_dir, data_dir=args.data, progress=log_progress)
        m = result.metrics
        print(f"{name}: CA {m['ca']:.4f} ASR {m['asr']} in {m['train_wall_time_s'] / 60:.1f} min", flush=True)
        write_index(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
