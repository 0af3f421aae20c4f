"""The ``ccpurify`` command. Parses arguments, calls the library, prints tables. Nothing below the
CLI prints or parses arguments (specs/design.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccpurify.progress import TqdmProgress

EXIT_USAGE = 2


class CliError(Exception):
    """An error whose message is shown to the user as one line, without a traceback."""


# ------------------------------------------------------------------------------------------ tables
def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain Markdown table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def count(x: float | int | None, unit: float = 1e6, suffix: str = "M") -> str:
    return "-" if x is None else f"{x / unit:.3f}{suffix}"


# -------------------------------------------------------------------------------------------- train
def _add_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", metavar="PATH", default=None,
        help="dataset location: a folder holding the archives, a zip, an image folder or the CIFAR-10 "
        "pickle folder (default: $CCPURIFY_DATA, then ../shared/data)",
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from ccpurify.train import RunExistsError, preset_config, train

    overrides = {k: v for k, v in dict(
        arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, target=args.target, poison_ratio=args.poison_ratio,
        train_subset=args.train_subset, test_subset=args.test_subset,
    ).items() if v is not None}  # fmt: skip
    attack = None if args.attack == "none" else args.attack
    config = preset_config(args.preset, args.dataset, attack, **overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{args.dataset}-{args.attack}-{config.arch}-{args.preset}-s{config.seed}"
    print(f"training {config.arch} (width {config.width}) on {args.dataset} with {args.attack}, preset {args.preset}, "
          f"{config.epochs} epochs -> {out}", file=sys.stderr)  # fmt: skip
    progress = TqdmProgress(leave=False)
    try:
        result = train(config, out, data_dir=args.data, progress=progress, overwrite=args.overwrite)
    except RunExistsError as exc:
        raise CliError(str(exc)) from exc
    finally:
        progress.close()
    m = result.metrics
    print(format_table(
        [[args.dataset, args.attack, config.arch, pct(m["ca"]), pct(m["asr"]), pct(m["ra"]), count(m["params"]),
          count(m["macs"]), f"{m['train_wall_time_s']:.0f}"]],
        ["dataset", "attack", "arch", "CA %", "ASR %", "RA %", "params", "MACs", "seconds"],
    ))  # fmt: skip
    print(f"run directory: {out}")
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from ccpurify import attacks
    from ccpurify.atomic import write_json
    from ccpurify.data import get_spec
    from ccpurify.evaluation import TestBench
    from ccpurify.io import load_model, read_metadata
    from ccpurify.train import open_run

    target = Path(args.model)
    test_subset, seed = args.test_subset, 0
    if target.is_dir():
        run = open_run(target)
        model, attack, dataset = run.load_model(), run.attack, run.config.dataset
        test_subset = test_subset if test_subset is not None else run.config.test_subset
        seed = run.config.seed
        out = Path(args.out) if args.out else target / "evaluation.json"
    else:
        meta = read_metadata(target) if target.suffix == ".safetensors" and target.is_file() else None
        dataset = args.dataset or (meta.extra.get("dataset") if meta else None) or "cifar10"
        kwargs = {"num_classes": args.num_classes or get_spec(dataset).num_classes}
        if args.width is not None:
            kwargs["width"] = args.width
        model = load_model(target, arch=args.arch, arch_kwargs=kwargs, allow_import=args.allow_import)
        attack = None
        if args.attack_from:
            attack = open_run(args.attack_from).attack
        elif args.attack and args.attack != "none":
            attack = attacks.create(args.attack, target=args.target, seed=args.attack_seed)
        out = Path(args.out) if args.out else target.with_suffix(".evaluation.json")
    bench = TestBench.build(dataset, attack, args.data, test_subset, seed)
    score = bench.score(model)
    m, c = score.metrics, score.cost
    print(format_table(
        [[str(target), dataset, attack.name if attack else "-", pct(m.ca), pct(m.asr), pct(m.ra), count(c.params), count(c.macs)]],
        ["model", "dataset", "attack", "CA %", "ASR %", "RA %", "params", "MACs"],
    ))  # fmt: skip
    write_json(out, {"model": str(target), "dataset": dataset, "attack": attack.recipe() if attack else None,
                     "test_subset": test_subset, **score.to_dict()})  # fmt: skip
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ccpurify import attacks, models
    from ccpurify.data import DATASETS
    from ccpurify.train import PRESETS

    parser = argparse.ArgumentParser(
        prog="ccpurify",
        description="Remove backdoors from neural networks and make them smaller: defenses as compression passes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a backdoored (or clean) model and write its run directory",
                       description="Train a model on poisoned data; writes manifest, weights, attack, indices, metrics.")  # fmt: skip
    t.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10", help="dataset to train on (default: cifar10)")
    t.add_argument("--attack", choices=[*attacks.list_attacks(), "none"], default="badnets",
                   help="backdoor attack; 'none' trains a clean model (default: badnets)")  # fmt: skip
    t.add_argument("--arch", choices=models.list_models(), default=None, help="model architecture (default: preact_resnet18)")
    t.add_argument("--preset", choices=sorted(PRESETS), default="ci",
                   help="training recipe: ci (seconds, data subset), cpu (benchmark zoo, ~20 min on 2 cores), "
                   "paper (BackdoorBench, 100 epochs, use with --device cuda) (default: ci)")  # fmt: skip
    t.add_argument("--seed", type=int, default=None, help="random seed for poisoning, init and batches (default: 0)")
    t.add_argument("--out", default=None, help="run directory to write (default: runs/<dataset>-<attack>-<arch>-<preset>-s<seed>)")
    t.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where to train (default: cpu)")
    t.add_argument("--width", type=float, default=None, help="channel-width multiplier, overrides the preset")
    t.add_argument("--epochs", type=int, default=None, help="number of epochs, overrides the preset")
    t.add_argument("--batch-size", type=int, default=None, help="batch size, overrides the preset")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate, overrides the preset")
    t.add_argument("--target", type=int, default=None, help="attack target class (default: 0)")
    t.add_argument("--poison-ratio", type=float, default=None, help="fraction of training images poisoned (default: 0.1)")
    t.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of this many images")
    t.add_argument("--test-subset", type=int, default=None, help="evaluate on a seeded subset of this many test images")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run or a mismatched checkpoint in --out")
    _add_data_option(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure CA / ASR / RA, params and MACs of a run directory or a weights file",
                       description="Evaluate a model on the clean test set and, given an attack, on its triggered set.")  # fmt: skip
    e.add_argument("model", help="a run directory, a ccpurify .safetensors file, or a weights file (.safetensors/.pt/.pth) with --arch")
    e.add_argument("--arch", choices=models.list_models(), default=None, help="architecture of a plain weights file")
    e.add_argument("--num-classes", type=int, default=None, help="classes of a plain weights file (default: the dataset's)")
    e.add_argument("--width", type=float, default=None, help="width multiplier of a plain weights file (default: 1)")
    e.add_argument("--dataset", choices=sorted(DATASETS), default=None, help="test set (default: from the model file, else cifar10)")
    e.add_argument("--attack", choices=[*attacks.list_attacks(), "none"], default=None,
                   help="score ASR/RA with this attack's default seeded trigger")  # fmt: skip
    e.add_argument("--attack-from", metavar="RUN_DIR", default=None, help="score ASR/RA with the exact trigger of a run directory")
    e.add_argument("--target", type=int, default=0, help="target class for --attack (default: 0)")
    e.add_argument("--attack-seed", type=int, default=0, help="seed of --attack's trigger (default: 0)")
    e.add_argument("--test-subset", type=int, default=None, help="score on a seeded subset of this many test images")
    e.add_argument("--out", default=None, help="where to write the JSON (default: <run>/evaluation.json or <weights>.evaluation.json)")
    e.add_argument("--allow-import", action="store_true", help="allow a model file's import-path architecture (only for files you trust)")
    _add_data_option(e)
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"ccpurify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        # Library errors carry one-line, actionable messages: show them without a traceback.
        print(f"ccpurify: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ccpurify: interrupted; a training run resumes from its checkpoint when started again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
