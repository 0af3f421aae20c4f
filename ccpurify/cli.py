"""The ``ccpurify`` command. Parses arguments, calls the library, prints tables. Nothing below the
CLI prints or parses arguments (docs/design.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccpurify.argtypes import at_least as _count
from ccpurify.argtypes import non_negative as _finite
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
        "--data",
        metavar="PATH",
        default=None,
        help="dataset location: a folder holding the archives, a zip, an image folder or the CIFAR-10 "
        "pickle folder (default: $CCPURIFY_DATA, then ../shared/data)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ccpurify.train import RunExistsError, preset_config, train

    overrides = {
        k: v
        for k, v in dict(
            arch=args.arch,
            width=args.width,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            target=args.target,
            poison_ratio=args.poison_ratio,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
        ).items()
        if v is not None
    }
    attack = None if args.attack == "none" else args.attack
    config = preset_config(args.preset, args.dataset, attack, **overrides)
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{args.dataset}-{args.attack}-{config.arch}-{args.preset}-s{config.seed}"
    )
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; name a run folder")
    print(
        f"training {config.arch} (width {config.width}) on {args.dataset} with {args.attack}, preset {args.preset}, "
        f"{config.epochs} epochs -> {out}",
        file=sys.stderr,
    )
    progress = TqdmProgress(leave=False)
    try:
        result = train(config, out, data_dir=args.data, progress=progress, overwrite=args.overwrite)
    except RunExistsError as exc:
        raise CliError(str(exc)) from exc
    finally:
        progress.close()
    m = result.metrics
    print(
        format_table(
            [
                [
                    args.dataset,
                    args.attack,
                    config.arch,
                    pct(m["ca"]),
                    pct(m["asr"]),
                    pct(m["ra"]),
                    count(m["params"]),
                    count(m["macs"]),
                    f"{m['train_wall_time_s']:.0f}",
                ]
            ],
            ["dataset", "attack", "arch", "CA %", "ASR %", "RA %", "params", "MACs", "seconds"],
        )
    )
    print(f"run directory: {out}")
    return 0


# ------------------------------------------------------------------------------------------ models
class ModelSource:
    """A model named on the command line: a run directory, a ccpurify file, or weights + --arch."""

    def __init__(self, path: str, args: argparse.Namespace, allow_onnx: bool = False) -> None:
        from ccpurify.data import get_spec
        from ccpurify.io import load_model, read_metadata
        from ccpurify.limits import DEFAULT_LIMITS, LoadLimits
        from ccpurify.train import open_run

        self.path = Path(path)
        self.run = None
        self.saved = None  # what a ccpurify model file records (SavedModel), when the model is one
        self.dataset_given = getattr(args, "dataset", None) is not None
        self.input_shape = _input_shape_option(getattr(args, "input_shape", None))
        if self.path.suffix == ".onnx":
            from ccpurify.evaluation import OnnxModel

            if not allow_onnx:
                raise CliError(
                    f"{path}: an ONNX file can be evaluated or benchmarked; this command needs the PyTorch model"
                )

            self.model, self.dataset = OnnxModel(self.path), getattr(args, "dataset", None) or "cifar10"
            return
        if self.path.is_dir():
            self.run = open_run(self.path)
            self.model, self.dataset, self.dataset_given = self.run.load_model(), self.run.config.dataset, True
            return
        meta = read_metadata(self.path) if self.path.suffix == ".safetensors" and self.path.is_file() else None
        self.saved = meta
        recorded = meta.extra.get("dataset") if meta else None
        self.dataset_given = self.dataset_given or isinstance(recorded, str)
        self.dataset = getattr(args, "dataset", None) or recorded or "cifar10"
        kwargs = {"num_classes": getattr(args, "num_classes", None) or get_spec(self.dataset).num_classes}
        if getattr(args, "width", None) is not None:
            kwargs["width"] = args.width
        limits = LoadLimits(max_params=args.max_params) if getattr(args, "max_params", None) else DEFAULT_LIMITS
        self.model = load_model(
            self.path,
            arch=getattr(args, "arch", None),
            arch_kwargs=kwargs,
            allow_import=getattr(args, "allow_import", False),
            limits=limits,
        )

    @property
    def normalize(self):
        """The model's input normalisation: the one its file records, else its dataset's mean and std
        where they fit the input's channels (none for, say, a one-channel model of unknown data)."""
        from ccpurify.data import Normalize, get_spec

        recorded = self.saved.extra.get("normalize") if self.saved is not None else None
        if (
            isinstance(recorded, dict)
            and isinstance(recorded.get("mean"), list)
            and isinstance(recorded.get("std"), list)
        ):
            return Normalize(tuple(recorded["mean"]), tuple(recorded["std"]))
        spec = get_spec(self.dataset)
        return Normalize(spec.mean, spec.std) if len(spec.mean) == self.example_inputs.shape[1] else None

    @property
    def example_inputs(self):
        """One zero image of the model's input size: --input-shape, else the size the model file
        records, else its dataset's (3 x 32 x 32 for CIFAR-10 and GTSRB)."""
        import torch

        from ccpurify.data import get_spec
        from ccpurify.recipe import input_shape_of

        shape = self.input_shape or input_shape_of(self.model)
        if shape is None:
            size = get_spec(self.dataset).image_size
            shape = (1, 3, size, size)
        return torch.zeros(shape)

    def onnx_metadata(self, report: dict | None = None) -> dict[str, str]:
        """Deployment metadata for this model's ONNX file: input shape, normalisation, class names
        (when the dataset is known and matches the model's outputs) and a purification summary."""
        from ccpurify.data import get_spec
        from ccpurify.probes import output_classes
        from exporters.metadata import deployment_metadata

        if report is None and self.saved is not None and isinstance(self.saved.extra.get("purify"), dict):
            report = _summary_of(self.saved.extra["purify"])
        names = get_spec(self.dataset).class_names if self.dataset_given else None
        if names is not None and output_classes(self.model, self.example_inputs) != len(names):
            names = None
        # Normalisation only where it is known (recorded in the file, or the model's dataset named)
        # and fits the input's channels: a guessed one in a shipped file would be worse than none.
        recorded = self.saved is not None and isinstance(self.saved.extra.get("normalize"), dict)
        norm = self.normalize if recorded or self.dataset_given else None
        if norm is not None and len(norm.mean) != self.example_inputs.shape[1]:
            norm = None
        return deployment_metadata(
            tuple(self.example_inputs.shape),
            mean=norm.mean if norm else None,
            std=norm.std if norm else None,
            class_names=names,
            report=report,
        )


def _summary_of(pipeline: dict) -> dict:
    """The summary ``PipelineReport.summary`` gives, from a saved pipeline report (``to_dict``)."""
    summary = {
        "pipeline": pipeline.get("pipeline") or " -> ".join(p.get("name", "?") for p in pipeline.get("passes", []))
    }
    for key in ("params", "macs"):
        if isinstance(pipeline.get(f"{key}_before"), int) and isinstance(pipeline.get(f"{key}_after"), int):
            summary[key] = [pipeline[f"{key}_before"], pipeline[f"{key}_after"]]
    if isinstance(pipeline.get("wall_time_s"), (int, float)):
        summary["wall_time_s"] = round(pipeline["wall_time_s"], 1)
    return summary


def _input_shape_option(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape C,H,W`` as a batch-1 shape, checked against the input limits."""
    if text is None:
        return None
    from ccpurify.limits import DEFAULT_LIMITS

    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise CliError(f"--input-shape takes C,H,W (e.g. 1,64,64), got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise CliError(f"--input-shape takes three positive numbers C,H,W (e.g. 1,64,64), got {text!r}")
    return DEFAULT_LIMITS.check_input_shape([1, *dims], "--input-shape")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from ccpurify import models
    from ccpurify.data import DATASETS
    from ccpurify.limits import DEFAULT_LIMITS

    p.add_argument("--arch", choices=models.list_models(), default=None, help="architecture of a plain weights file")
    p.add_argument(
        "--num-classes", type=int, default=None, help="classes of a plain weights file (default: the dataset's)"
    )
    p.add_argument("--width", type=float, default=None, help="width multiplier of a plain weights file (default: 1)")
    p.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=None,
        help="dataset of the model (default: from the model file, else cifar10)",
    )
    p.add_argument(
        "--allow-import",
        action="store_true",
        help="allow a model file's import-path architecture (only for files you trust)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        help="the model's input size, e.g. 1,64,64 (default: what the model file records, else the dataset's 3,32,32)",
    )
    p.add_argument(
        "--max-params",
        type=_count(1),
        default=None,
        metavar="N",
        help=f"refuse model files declaring more parameters than this (default: {DEFAULT_LIMITS.max_params:,}; see README, Security model)",
    )


# ----------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from ccpurify import attacks
    from ccpurify.atomic import refuse_existing, write_json
    from ccpurify.data import get_spec
    from ccpurify.evaluation import TestBench
    from ccpurify.train import open_run

    source = ModelSource(args.model, args, allow_onnx=True)
    target, model, dataset = source.path, source.model, source.dataset
    test_subset, seed = args.test_subset, 0
    if source.run is not None:
        attack = source.run.attack
        test_subset = test_subset if test_subset is not None else source.run.config.test_subset
        seed = source.run.config.seed
        out = Path(args.out) if args.out else target / "evaluation.json"
    else:
        attack = None
        if args.attack_from:
            attack = open_run(args.attack_from).attack
        elif args.attack and args.attack != "none":
            attack = attacks.create(args.attack, target=args.target, seed=args.attack_seed)
        out = Path(args.out) if args.out else target.with_suffix(".evaluation.json")
    refuse_existing(out, args.overwrite)
    _output_beside(out, [target])
    classes = get_spec(dataset).num_classes
    if attack is not None and not 0 <= attack.target < classes:
        raise CliError(f"--target must be a class of {dataset} (0 to {classes - 1}), got {attack.target}")
    bench = TestBench.build(dataset, attack, args.data, test_subset, seed)
    progress = TqdmProgress(leave=False)
    try:
        score = bench.score(model, progress)
    finally:
        progress.close()
    m, c = score.metrics, score.cost
    print(
        format_table(
            [
                [
                    str(target),
                    dataset,
                    attack.name if attack else "-",
                    pct(m.ca),
                    pct(m.asr),
                    pct(m.ra),
                    count(c.params),
                    count(c.macs),
                ]
            ],
            ["model", "dataset", "attack", "CA %", "ASR %", "RA %", "params", "MACs"],
        )
    )
    write_json(
        out,
        {
            "model": str(target),
            "dataset": dataset,
            "attack": attack.recipe() if attack else None,
            "test_subset": test_subset,
            **score.to_dict(),
        },
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ purify
def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.75, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text}")
    return value


def _output_beside(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, holds or lies inside one of the inputs (it would destroy them)."""
    o = out.resolve()
    for i in inputs:
        r = i.resolve()
        if (
            o == r
            or r.is_relative_to(o)
            or (r.is_dir() and o.is_relative_to(r) and o.name in {"model.safetensors", "manifest.json"})
        ):
            raise CliError(f"the output {out} would replace the input {i}; choose another --out")


def _json_number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: a whole number written in exponent form without a
    decimal point (``1e5``) is the integer it names, so a count option takes it."""
    from ccpurify.passes.options import MAX_COUNT

    value = float(text)
    if "." not in text and value.is_integer() and abs(value) <= MAX_COUNT:
        return int(value)
    return value


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` with JSON values where they parse (numbers, true/false, null, lists), else a string;
    ``1e5`` reads as the integer 100000."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise CliError(f"--set expects key=value, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(raw, parse_float=_json_number)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), raw
    except (ValueError, RecursionError) as exc:  # e.g. an integer literal of thousands of digits
        raise CliError(f"--set {key}: cannot read the value ({str(exc)[:80]})") from None


def cmd_purify(args: argparse.Namespace) -> int:
    import time

    from ccpurify import defender
    from ccpurify.api import plan
    from ccpurify.atomic import atomic_directory, refuse_existing, write_json
    from ccpurify.evaluation import TestBench, compare
    from ccpurify.provenance import PROTOCOL_VERSION, git_commit, machine, now, versions
    from exporters.onnx import export

    if args.plot and args.no_export:
        raise CliError("--plot times the exported ONNX files: leave out --no-export")
    source = ModelSource(args.model, args)
    options = dict(parse_option(o) for o in args.set)
    if "macs" in options and args.macs is not None:
        raise CliError("give the MACs target once: --macs or --set macs=, not both")
    clean = unlabeled = None
    if args.clean_data:
        # A run directory gives its 500-image defender subset whatever the method, as the grid does.
        clean = defender.clean_data(args.clean_data, source.dataset, rnp=True, data_dir=args.data)
    elif source.run is not None and args.method in ("rnp",):
        clean = defender.clean_data(source.path, source.dataset, rnp=True, data_dir=args.data)
    if args.unlabeled_data:
        unlabeled = defender.unlabeled_data(
            args.unlabeled_data, source.dataset, count=args.unlabeled_count, seed=args.seed, data_dir=args.data
        )
    elif source.run is not None and args.method in ("bcu",):
        unlabeled = defender.unlabeled_data(
            source.path, source.dataset, count=args.unlabeled_count, seed=args.seed, data_dir=args.data
        )
    out = (
        Path(args.out)
        if args.out
        else (source.path if source.path.is_dir() else source.path.parent) / f"purified-{args.method or 'default'}"
    )
    _output_beside(out, [source.path] + [Path(p) for p in (args.clean_data, args.unlabeled_data) if p])
    refuse_existing(
        out, args.overwrite, "the output folder", folder=True
    )  # before the long work, and again when written
    progress = TqdmProgress(leave=False)
    started = time.perf_counter()
    try:
        planned = plan(
            source.model,
            args.method,
            example_inputs=source.example_inputs,
            clean_data=clean,
            unlabeled_data=unlabeled,
            seed=args.seed,
            device=args.device,
            progress=progress,
            normalize=source.normalize,
            macs=args.macs,
            **options,
        )
        print(_estimate_line(planned.pipeline, *planned.estimate_seconds(source.model)), file=sys.stderr)
        result = planned.run(source.model)
    finally:
        progress.close()
    wall = time.perf_counter() - started
    for p in result.report.passes:
        if p.details.target_reached() is False:
            print(
                f"ccpurify: warning: {p.name} could not reach its target; it kept {p.macs_ratio:.2f} of the MACs "
                "(see the report)",
                file=sys.stderr,
            )
    used = [
        f"{len(d.x)} {what} images"
        for d, what in ((clean, "labelled clean"), (unlabeled, "unlabelled"))
        if d is not None
    ]
    print(f"data: {', '.join(used) if used else 'none (data-free)'}")
    report = {
        "input": str(source.path),
        "method": args.method or "default",
        "ran": result.report.pipeline,
        "options": options,
        "seed": args.seed,
        "pipeline": result.report.to_dict(),
    }
    rows, header = [], ["model", "CA %", "ASR %", "RA %", "params", "MACs"]
    before = after = None
    if source.run is not None:
        bench = TestBench.build(
            source.dataset, source.run.attack, args.data, source.run.config.test_subset, source.run.config.seed
        )
        progress = TqdmProgress(leave=False)
        try:
            before, after = bench.score(source.model, progress), bench.score(result.model, progress)
        finally:
            progress.close()
        report["evaluation"] = compare(before, after)
        for label, sc in (("before", before), ("after", after)):
            m = sc.metrics
            rows.append([label, pct(m.ca), pct(m.asr), pct(m.ra), count(sc.cost.params), count(sc.cost.macs)])
        header.append("DER %")
        rows[0].append("-")
        rows[1].append(pct(report["evaluation"].get("der")))
        for warning in _outcome_warnings(before.metrics, after.metrics):
            print(f"ccpurify: warning: {warning}", file=sys.stderr)
    else:
        pr = result.report
        rows = [
            ["before", "-", "-", "-", count(pr.params_before), count(pr.macs_before)],
            ["after", "-", "-", "-", count(pr.params_after), count(pr.macs_after)],
        ]
    with atomic_directory(out, overwrite=args.overwrite) as tmp:  # the run folder appears complete or not at all
        result.save(tmp / "model.safetensors", extra={"dataset": source.dataset})
        if not args.no_export:
            summary = {
                **result.report.summary(),
                **({"scores": report["evaluation"]} if "evaluation" in report else {}),
            }
            metadata = source.onnx_metadata(summary)
            report["onnx"] = export(
                result.model, tmp / "model.onnx", source.example_inputs, metadata=metadata
            ).to_dict()
            report["onnx"]["path"] = str(out / "model.onnx")
        if args.plot:
            report["latency"] = _plot_run(tmp, source, result, before, after, export)
        write_json(tmp / "report.json", report)
        write_json(
            tmp / "manifest.json",
            {
                "kind": "ccpurify.purify",
                "protocol": PROTOCOL_VERSION,
                "created": now(),
                "versions": versions(),
                "git_commit": git_commit(),
                "machine": machine(),
                "seed": args.seed,
                "method": args.method or "default",
                "options": options,
                "input": str(source.path),
                "wall_time_s": wall,
                "files": sorted([p.name for p in tmp.iterdir() if p.is_file()] + ["manifest.json"]),
            },
        )
    print(format_table(rows, header))
    _print_outcome(args, result.report, report.get("latency"), wall, out)
    return 0


def _print_outcome(args: argparse.Namespace, pipeline, latency: dict | None, wall: float, out: Path) -> None:
    """After a purify run's table: its budget, what the passes chose, latency, and what was written."""
    print(f"budget: {pipeline.budget()}")
    if choices := pipeline.choices():
        print(f"chosen: {choices}")
    if latency is not None:
        print(
            f"latency (onnxruntime, batch 1, 1 thread, interleaved): {latency['before_median_ms']:.3f} -> "
            f"{latency['after_median_ms']:.3f} ms (x{latency['ratio']:.2f}); picture: {out / 'report.png'}"
        )
    print(
        f"{args.method or 'default pipeline'} ({pipeline.pipeline}): {wall:.1f} s; wrote {out / 'model.safetensors'}, "
        "report.json, manifest.json" + ("" if args.no_export else ", model.onnx") + f" in {out}"
    )


def _estimate_line(pipeline, seconds: float, steps: int) -> str:
    names = " -> ".join(p.name for p in pipeline.passes)
    if not steps:
        return f"ccpurify: running {names} (no training: seconds)"
    minutes = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return f"ccpurify: running {names}: about {minutes} on this machine ({steps:,} sample-steps of training or image synthesis)"


def _plot_run(folder: Path, source: ModelSource, result, before, after, export) -> dict:
    """Time the input model's and the purified model's ONNX files interleaved and draw
    ``folder/report.png`` (scores where measured, weights kept per layer, latency); returns the
    latency summary for the report."""
    import tempfile

    from ccpurify.plots import layer_weights_kept, purification_figure
    from exporters.latency import BenchConfig, benchmark

    with tempfile.TemporaryDirectory() as tmp:
        dense = export(source.model, Path(tmp) / "input.onnx", source.example_inputs).path
        timing = benchmark({"before": dense, "after": folder / "model.onnx"}, BenchConfig(runs=150, torch_eager=False))
    samples = {k: timing.timing(k, "onnxruntime", 1, 1) for k in ("before", "after")}
    scores = None
    if before is not None:
        scores = {"before": (before.metrics.ca, before.metrics.asr), "after": (after.metrics.ca, after.metrics.asr)}
    purification_figure(
        folder / "report.png",
        f"{source.path.name}: {result.report.pipeline}",
        scores=scores,
        kept=layer_weights_kept(source.model, result.model),
        latency_ms={k: t.samples_ms for k, t in samples.items()},
    )
    return {
        "before_median_ms": samples["before"].median_ms,
        "after_median_ms": samples["after"].median_ms,
        "ratio": samples["after"].median_ms / samples["before"].median_ms,
        "runs": samples["after"].runs,
        "benchmark_config": timing.config.to_dict(),
    }


# -------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from ccpurify.demo import run_demo

    options = dict(parse_option(o) for o in args.set)
    if "macs" in options and args.macs is not None:
        raise CliError("give the MACs target once: --macs or --set macs=, not both")
    print(
        "ccpurify demo: a backdoored CIFAR-10 PreAct-ResNet18 (zoo entry cifar10-badnets) is purified without any "
        "data, exported to ONNX and benchmarked; 1,000 embedded test images score it.",
        file=sys.stderr,
    )
    progress = TqdmProgress(leave=False)
    try:
        result = run_demo(
            args.out,
            args.method,
            options,
            progress=progress,
            runs=args.runs,
            macs=args.macs,
            overwrite=args.overwrite,
            on_estimate=lambda pipeline, seconds, steps: print(
                _estimate_line(pipeline, seconds, steps), file=sys.stderr
            ),
        )
    finally:
        progress.close()
    rows = [
        [
            r["model"],
            pct(r["ca"]),
            pct(r["asr"]),
            count(r["params"]),
            count(r["macs"]),
            f"{r['latency_ms_bs1_t1']:.3f}",
            f"{r['onnx_bytes'] / 1e6:.2f}",
        ]
        for r in result.rows
    ]
    a, b = result.rows
    rows.append(
        [
            "after / before",
            f"{100 * (b['ca'] - a['ca']):+.2f} pt",
            f"{100 * (b['asr'] - a['asr']):+.2f} pt",
            f"x{b['params'] / a['params']:.2f}",
            f"x{b['macs'] / a['macs']:.2f}",
            f"x{b['latency_ms_bs1_t1'] / a['latency_ms_bs1_t1']:.2f}",
            f"x{b['onnx_bytes'] / a['onnx_bytes']:.2f}",
        ]
    )
    print(format_table(rows, ["model", "CA %", "ASR %", "params", "MACs", "ms (b1, 1 thread)", "ONNX MB"]))
    print(f"budget: no data; {result.budget}")
    print(
        f"purified in {result.purify_seconds:.1f} s; outputs (ONNX files, purified model, report.json, report.png) in {result.out_dir}"
    )
    return 0


# ------------------------------------------------------------------------------------------ export
def _train_images(dataset: str, count: int, run, data_dir, seed: int = 0):
    """Model-ready training images for calibration: the run's defender subset, else a seeded draw."""
    import numpy as np
    import torch

    from ccpurify.data import Normalize, get_spec, load_dataset

    spec = get_spec(dataset)
    train = load_dataset(dataset, "train", data_dir)
    pool = np.asarray(run.defender.clean_subset) if run is not None else np.arange(len(train))
    idx = np.random.default_rng(seed).choice(pool, size=min(count, len(pool)), replace=False)
    x = torch.from_numpy(train.images[np.sort(idx)]).permute(0, 3, 1, 2).float() / 255
    return Normalize(spec.mean, spec.std)(x).numpy()


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ccpurify.atomic import refuse_existing
    from ccpurify.data import Normalize, get_spec, load_dataset
    from exporters.onnx import export

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise CliError(f"--out must name an .onnx file, got {out}")
    _output_beside(out, [Path(args.model)])
    for path in [
        out,
        *([out.with_suffix(".int8.onnx")] if args.int8 else []),
        *([out.with_suffix(".ort")] if args.ort else []),
    ]:
        refuse_existing(path, args.overwrite)
    source = ModelSource(args.model, args)
    if args.int8:
        from ccpurify.data import get_spec
        from ccpurify.errors import InvalidInputError

        size = get_spec(source.dataset).image_size
        if tuple(source.example_inputs.shape[1:]) != (3, size, size):
            raise InvalidInputError(
                f"--int8 calibrates on {source.dataset} training images (3x{size}x{size}) but the model takes "
                f"{'x'.join(map(str, source.example_inputs.shape[1:]))}; export without --int8 and quantize with "
                "exporters.quantize.quantize_int8 on images of your own"
            )
    report = export(
        source.model,
        out,
        source.example_inputs,
        opset=args.opset,
        tolerance=args.tolerance,
        metadata=source.onnx_metadata(),
        strip_debug=not args.keep_debug_info,
        dynamic_batch=not args.static_shape,
    )
    rows = [
        [
            out.name,
            f"{report.file_bytes / 1e6:.2f} MB",
            count(report.params),
            count(report.macs),
            f"{report.parity_max_abs_diff:.2e}",
            "-",
        ]
    ]
    if args.int8:
        from exporters.quantize import quantize_int8

        calib = _train_images(source.dataset, args.calibration_images, source.run, args.data)
        eval_x = eval_y = None
        if args.eval_images > 0:
            spec = get_spec(source.dataset)
            test = load_dataset(source.dataset, "test", args.data)
            n = min(args.eval_images, len(test))
            eval_x = Normalize(spec.mean, spec.std)(
                torch.from_numpy(test.images[:n]).permute(0, 3, 1, 2).float() / 255
            ).numpy()
            eval_y = test.labels[:n]
        q = quantize_int8(
            out,
            out.with_suffix(".int8.onnx"),
            calib,
            eval_images=eval_x,
            eval_labels=eval_y,
            per_channel=not args.per_tensor,
            reduce_range=not args.full_range,
            calibration=args.calibration,
            exclude_nodes=args.exclude_node,
        )
        change = "-" if q.accuracy_change is None else f"{100 * q.accuracy_change:+.2f} pt"
        rows.append(
            [
                Path(q.path).name,
                f"{q.file_bytes / 1e6:.2f} MB",
                "-",
                "-",
                f"agree {q.agreement:.3f}" if q.agreement is not None else "-",
                change,
            ]
        )
    print(format_table(rows, ["file", "size", "params", "MACs", "max |Δlogit| / agreement", "accuracy change"]))
    _mobile_outputs(out, args)
    if args.int8 and source.run is not None and source.run.attack is not None and args.eval_images > 0:
        # Quantization can revive a backdoor: score the INT8 file's ASR next to the fp32 file's.
        from ccpurify.evaluation import OnnxModel, TestBench

        bench = TestBench.build(source.dataset, source.run.attack, args.data, args.eval_images, source.run.config.seed)
        progress = TqdmProgress(leave=False)
        try:
            scores = {
                name: bench.score(OnnxModel(path), progress).metrics
                for name, path in (("fp32", out), ("int8", out.with_suffix(".int8.onnx")))
            }
        finally:
            progress.close()
        print(format_table([[k, pct(m.ca), pct(m.asr)] for k, m in scores.items()], ["ONNX file", "CA %", "ASR %"]))
        for warning in _outcome_warnings(scores["fp32"], scores["int8"], "INT8 quantization"):
            print(f"ccpurify: warning: {warning}", file=sys.stderr)
    return 0


def _mobile_outputs(onnx_path: Path, args: argparse.Namespace) -> None:
    """``export --mobile-check`` and ``--ort``: onnxruntime mobile's verdicts and the ORT-format file."""
    if args.mobile_check:
        from exporters.mobile import check_mobile

        check = check_mobile(onnx_path)
        rows = [
            [ep, check.as_is.get(ep, "-"), check.fixed_shapes.get(ep, "-")]
            for ep in sorted({*check.as_is, *check.fixed_shapes})
        ]
        print(format_table(rows, ["execution provider", "works well as is", "with fixed input shapes"]))
    if args.ort:
        from exporters.mobile import convert_to_ort

        ort_path = convert_to_ort(onnx_path, onnx_path.with_suffix(".ort"))
        print(
            f"wrote {ort_path} ({ort_path.stat().st_size / 1e6:.2f} MB) and {ort_path.with_suffix('.required_operators.config').name}"
        )


def _outcome_warnings(before, after, what: str = "the defense") -> list[str]:
    """What a user must not miss in a before/after pair: a backdoor left in place, or CA lost."""
    out = []
    if before.asr is not None and after.asr is not None and after.asr > 0.2 and after.asr > 0.5 * before.asr:
        out.append(
            f"after {what} ASR is still {100 * after.asr:.1f}% (was {100 * before.asr:.1f}%): the backdoor is not removed"
        )
    if before.ca - after.ca > 0.10:
        out.append(
            f"{what} cost {100 * (before.ca - after.ca):.1f} points of clean accuracy ({100 * before.ca:.1f} -> {100 * after.ca:.1f}%)"
        )
    return out


# ------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from ccpurify.atomic import refuse_existing, write_json, write_text
    from exporters.latency import benchmark, config_from_options
    from exporters.onnx import export

    if all(m.endswith(".json") for m in args.models):
        return _render_reports(args.models)
    if any(m.endswith(".json") for m in args.models):
        raise CliError("give either JSON reports (to print) or models (to time), not both")
    for path in (args.out, args.markdown):
        if path:
            refuse_existing(path, args.overwrite)
    config = config_from_options(args, torch_eager=not args.no_torch)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_paths, torch_models = {}, {}
        for i, path in enumerate(args.models):
            name = Path(path).stem if Path(path).stem not in onnx_paths else f"{Path(path).stem}-{i}"
            if path.endswith(".onnx"):
                onnx_paths[name] = path
            else:
                source = ModelSource(path, args)
                onnx_paths[name] = export(source.model, Path(tmp) / f"{i}.onnx", source.example_inputs).path
                torch_models[name] = source.model
        progress = TqdmProgress(leave=False)
        report = benchmark(onnx_paths, config, torch_models=torch_models, progress=progress)
        progress.close()
    print(report.to_markdown())
    if args.out:
        write_json(args.out, report.to_dict())
    if args.markdown:
        write_text(args.markdown, report.to_markdown() + "\n")
    return 0


def _render_reports(paths: list[str]) -> int:
    """Print reports measured elsewhere (``python -m exporters.latency --out``, e.g. on the board)."""
    import json

    from ccpurify.errors import InvalidInputError
    from exporters.latency import BenchReport

    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: not a readable JSON report ({exc})") from exc
        report = BenchReport.from_dict(data)
        print(f"## {path}: measured on {report.environment.get('cpu', '?')}\n")
        print(report.to_markdown())
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ccpurify import attacks, models
    from ccpurify.data import DATASETS
    from ccpurify.train import PRESETS
    from exporters.latency import add_options as add_bench_options

    parser = argparse.ArgumentParser(
        prog="ccpurify",
        description="Remove backdoors from neural networks and make them smaller: defenses as compression passes.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="train a backdoored (or clean) model and write its run directory",
        description="Train a model on poisoned data; writes manifest, weights, attack, indices, metrics.",
    )
    t.add_argument(
        "--dataset", choices=sorted(DATASETS), default="cifar10", help="dataset to train on (default: cifar10)"
    )
    t.add_argument(
        "--attack",
        choices=[*attacks.list_attacks(), "none"],
        default="badnets",
        help="backdoor attack; 'none' trains a clean model (default: badnets)",
    )
    t.add_argument(
        "--arch", choices=models.list_models(), default=None, help="model architecture (default: preact_resnet18)"
    )
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="ci",
        help="training recipe: ci (seconds, data subset), cpu (benchmark zoo, ~20 min on 2 cores), "
        "paper (BackdoorBench, 100 epochs, use with --device cuda) (default: ci)",
    )
    t.add_argument("--seed", type=int, default=None, help="random seed for poisoning, init and batches (default: 0)")
    t.add_argument(
        "--out", default=None, help="run directory to write (default: runs/<dataset>-<attack>-<arch>-<preset>-s<seed>)"
    )
    t.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where to train (default: cpu)")
    t.add_argument("--width", type=float, default=None, help="channel-width multiplier, overrides the preset")
    t.add_argument("--epochs", type=int, default=None, help="number of epochs, overrides the preset")
    t.add_argument("--batch-size", type=int, default=None, help="batch size, overrides the preset")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate, overrides the preset")
    t.add_argument("--target", type=int, default=None, help="attack target class (default: 0)")
    t.add_argument(
        "--poison-ratio", type=float, default=None, help="fraction of training images poisoned (default: 0.1)"
    )
    t.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of this many images")
    t.add_argument("--test-subset", type=int, default=None, help="evaluate on a seeded subset of this many test images")
    t.add_argument(
        "--overwrite", action="store_true", help="replace a finished run or a mismatched checkpoint in --out"
    )
    _add_data_option(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate",
        help="measure CA / ASR / RA, params and MACs of a run directory or a weights file",
        description="Evaluate a model on the clean test set and, given an attack, on its triggered set.",
    )
    e.add_argument(
        "model",
        help="a run directory, a ccpurify .safetensors file, a weights file (.safetensors/.pt/.pth) with --arch, "
        "or an exported .onnx file (fp32 or INT8: the file that ships is what gets scored)",
    )
    _add_model_options(e)
    e.add_argument(
        "--attack",
        choices=[*attacks.list_attacks(), "none"],
        default=None,
        help="score ASR/RA with this attack's default seeded trigger",
    )
    e.add_argument(
        "--attack-from", metavar="RUN_DIR", default=None, help="score ASR/RA with the exact trigger of a run directory"
    )
    e.add_argument("--target", type=int, default=0, help="target class for --attack (default: 0)")
    e.add_argument("--attack-seed", type=int, default=0, help="seed of --attack's trigger (default: 0)")
    e.add_argument(
        "--test-subset", type=_count(1), default=None, help="score on a seeded subset of this many test images"
    )
    e.add_argument(
        "--out",
        default=None,
        help="where to write the JSON (default: <run>/evaluation.json or <weights>.evaluation.json)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_data_option(e)
    e.set_defaults(func=cmd_evaluate)

    from ccpurify import passes

    u = sub.add_parser(
        "purify",
        help="remove a backdoor (and shrink the model) with a defense or a pipeline",
        description="Run a defense pass on a model; write the purified model, its ONNX file and a JSON report. "
        "Given a run directory, CA/ASR/RA are measured before and after.",
    )
    u.add_argument("model", help="a run directory, a ccpurify .safetensors file, or a weights file with --arch")
    _add_model_options(u)
    u.add_argument(
        "--method",
        choices=passes.list_passes(),
        default=None,
        help="the pass to run (default: the default pipeline for the data given; see README)",
    )
    u.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pass option, e.g. --set u=2.5 --set mode=faithful (repeatable)",
    )
    u.add_argument(
        "--macs",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="fraction of the dense MACs to keep: the default pipeline's target (default: the one it was chosen at), "
        "or the macs option of --method",
    )
    u.add_argument(
        "--clean-data",
        default=None,
        metavar="PATH",
        help="labelled clean images: a run directory (its defender subset) or an image folder/zip in the dataset's class layout",
    )
    u.add_argument(
        "--unlabeled-data",
        default=None,
        metavar="PATH",
        help="unlabelled images: a run directory (its pool) or any image folder/zip, any dataset (test/val folders are skipped)",
    )
    u.add_argument(
        "--unlabeled-count",
        type=_count(1),
        default=5000,
        help="at most this many unlabelled images, drawn at random with --seed from a larger source (default: 5000)",
    )
    u.add_argument("--out", default=None, help="output folder (default: purified-<method> next to the input)")
    u.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)"
    )
    u.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    u.add_argument(
        "--plot",
        action="store_true",
        help="also time the ONNX files before and after (interleaved) and draw report.png: CA/ASR, weights kept per layer, latency",
    )
    u.add_argument("--seed", type=int, default=0, help="seed of every random choice in the passes (default: 0)")
    u.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run the passes (default: cpu)")
    _add_data_option(u)
    u.set_defaults(func=cmd_purify)

    d = sub.add_parser(
        "demo",
        help="the end-to-end demo on the embedded backdoored model (no data needed)",
        description="Purify the embedded backdoored CIFAR-10 model with the default data-free pipeline, "
        "export both models to ONNX, benchmark them, and print one before/after table.",
    )
    d.add_argument(
        "--out", default="runs/demo", help="where the ONNX files, purified model and report go (default: runs/demo)"
    )
    d.add_argument(
        "--method", choices=passes.list_passes(), default=None, help="run this pass instead of the default pipeline"
    )
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of --method (repeatable)")
    d.add_argument(
        "--macs",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="fraction of the dense MACs to keep (default: the default pipeline's chosen target)",
    )
    d.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out folder that is not a previous demo's"
    )
    d.add_argument(
        "--runs", type=_count(50), default=100, help="timed onnxruntime runs per model (default: 100, at least 50)"
    )
    d.set_defaults(func=cmd_demo)

    x = sub.add_parser(
        "export",
        help="export a model to one verified ONNX file (optionally also INT8)",
        description="Export to ONNX (dynamic batch, opset 20), check it, compare onnxruntime with PyTorch.",
    )
    x.add_argument("model", help="a run directory, a ccpurify .safetensors file, or a weights file with --arch")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    _add_model_options(x)
    x.add_argument("--opset", type=int, default=20, help="ONNX opset, 18 to 23 (default: 20)")
    x.add_argument("--overwrite", action="store_true", help="replace existing output files")
    x.add_argument(
        "--tolerance",
        type=_finite,
        default=1e-4,
        help="largest |logit difference| accepted between onnxruntime and PyTorch (default: 1e-4)",
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="also write <out>.int8.onnx: static QDQ quantization calibrated on training images",
    )
    x.add_argument(
        "--calibration-images",
        type=_count(1),
        default=256,
        help="training images used to calibrate INT8 (default: 256)",
    )
    x.add_argument(
        "--eval-images",
        type=_count(0),
        default=1000,
        help="test images used to report INT8's accuracy change (default: 1000; 0 skips)",
    )
    x.add_argument(
        "--per-tensor", action="store_true", help="INT8: one scale per weight tensor instead of per output channel"
    )
    x.add_argument(
        "--full-range",
        action="store_true",
        help="INT8: full 8-bit weights (reduce_range off); right on ARM and VNNI CPUs, may overflow on older x86",
    )
    x.add_argument(
        "--calibration",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="INT8: how activation ranges are chosen from the calibration images (default: minmax)",
    )
    x.add_argument(
        "--exclude-node",
        action="append",
        default=[],
        metavar="NAME",
        help="INT8: keep this ONNX node in float (repeatable), e.g. a sensitive first convolution",
    )
    x.add_argument(
        "--keep-debug-info",
        action="store_true",
        help="keep the exporter's per-node debug annotations (stack traces with local paths)",
    )
    x.add_argument(
        "--mobile-check",
        action="store_true",
        help="run onnxruntime's mobile usability checker: will NNAPI / CoreML take the file (as is, with fixed shapes)",
    )
    x.add_argument(
        "--static-shape",
        action="store_true",
        help="a fixed batch of 1 instead of a dynamic batch: NNAPI and CoreML take only fixed shapes",
    )
    x.add_argument(
        "--ort",
        action="store_true",
        help="also write <out>.ort (ORT format for onnxruntime mobile builds) and its operator list",
    )
    _add_data_option(x)
    x.set_defaults(func=cmd_export)

    b = sub.add_parser(
        "bench",
        help="measure onnxruntime (and PyTorch) latency of models, interleaved, with ratios to the first",
        description="Latency benchmark with explicit settings; several models are measured interleaved.",
    )
    b.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="models (.onnx files, run directories or model files, exported on the fly; the first is the baseline), "
        "or JSON reports written on a device by python -m exporters.latency --out, to print",
    )
    _add_model_options(b)
    add_bench_options(b)
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager timings")
    b.add_argument("--out", default=None, help="write the report as JSON here")
    b.add_argument("--markdown", default=None, help="write the report as a Markdown table here")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out or --markdown file")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad input, limits, missing data: ``CcpurifyError``, and
    the operating system's file errors) print one line and exit 1 (2 for usage errors); anything
    else is a bug in ccpurify and keeps its traceback. ``--debug`` shows the traceback always."""
    import traceback

    from ccpurify.errors import CcpurifyError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        if args.debug:
            raise
        print(f"ccpurify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CcpurifyError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc) if not isinstance(exc, OSError) or isinstance(exc, CcpurifyError) else _os_error(exc)
        print(f"ccpurify: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "ccpurify: interrupted; nothing half-written was left (a training run resumes from its checkpoint)",
            file=sys.stderr,
        )
        return 130
    except Exception:
        if args.debug:
            raise
        traceback.print_exc()
        print(
            "ccpurify: internal error: this is a bug in ccpurify; please report it with the traceback above",
            file=sys.stderr,
        )
        return 3


def _os_error(exc: OSError) -> str:
    """One line for a file-system error: what failed, on which path."""
    if exc.strerror is None:
        return str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}"


if __name__ == "__main__":
    sys.exit(main())
