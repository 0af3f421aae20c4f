"""Build the demo's embedded assets (ccpurify/assets/demo/) from the zoo and the CIFAR-10 archive.

    python -m benchmarks.make_demo_assets [--entry cifar10-badnets] [--per-class 100]

Copies the zoo entry's model, trigger recipe and trigger tensors, and writes a zip of
``per_class`` original JPEG files per class from the CIFAR-10 *test* split (bytes copied, not
re-encoded), plus a manifest with sha256 sums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from ccpurify.atomic import atomic_path, write_json
from ccpurify.data import CIFAR10, locate

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "ccpurify" / "assets" / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="cifar10-badnets")
    parser.add_argument("--zoo", default=str(HERE / "zoo"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    run = Path(args.zoo) / args.entry
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "attack.json", "attack.safetensors"):
        shutil.copyfile(run / name, ASSETS / name)
    source = locate("cifar10", args.data)
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(source) as src, atomic_path(ASSETS / "test-sample.zip") as tmp:
        names = src.namelist()
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
            for cls in CIFAR10.class_names:
                members = sorted(n for n in names if n.split("/")[-3:-1] == ["test", cls] and n.endswith(".jpg"))
                for n in sorted(rng.choice(members, size=args.per_class, replace=False)):
                    dst.writestr(f"test/{cls}/{n.split('/')[-1]}", src.read(n))
    manifest = json.loads((run / "manifest.json").read_text())
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ASSETS.iterdir())
        if p.name != "manifest.json"
    }
    write_json(
        ASSETS / "manifest.json",
        {
            "zoo_entry": args.entry,
            "zoo_metrics": manifest["metrics"],
            "zoo_config": manifest["config"],
            "zoo_git_commit": manifest.get("git_commit"),
            "test_images": args.per_class * len(CIFAR10.class_names),
            "test_sample_source": "CIFAR-10 test split (shared/data/cifar10-jpeg.zip), seeded draw, original JPEG bytes",
            "files": files,
        },
    )
    total = sum((ASSETS / f).stat().st_size for f in files)
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB, to {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
