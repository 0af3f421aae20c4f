"""Latency benchmarking with onnxruntime (and PyTorch eager for comparison), every knob explicit.

Protocol (docs/reference/ecosystem.md §5.2): fixed intra-op threads (default 1: on small VMs more
threads with spinning are slower), inter-op 1, sequential execution, a chosen graph optimisation
level, spinning off unless asked; one fixed input per batch size; warm-up runs; at least 50 timed
runs; median, p90, mean and coefficient of variation. Several models are measured *interleaved* in
rounds (A B, B A, A B...) so drift hits all of them alike; ratios are the headline, absolute times
belong to the machine that measured them.

What a timing holds: each onnxruntime run goes through an ``IOBinding`` whose input and outputs
are bound once to preallocated buffers, so no numpy conversion or output allocation is timed. What
is left of Python's call into onnxruntime is measured on the same footing, on a graph that only
copies the input (``call_overhead_ms`` per batch and thread count, in the report's environment),
and ratios are given both as measured and with that overhead taken off both sides
(``latency_ratio_net``), which matters for small models at batch 1.

Needs only onnxruntime and numpy: torch is imported only to time PyTorch eager models
(``torch_models``), and the ``onnx`` package only to count params and MACs (left out, as None, where
it is not installed), so the same code runs on the target device. Conventions follow
``onnxruntime_perf_test``: count mode (``runs``) or duration mode (``duration_s``), free-dimension
overrides (``free_dimensions``, its ``-f``), execution providers in priority order.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from ccpurify.argtypes import at_least, positive_seconds
from ccpurify.errors import InvalidInputError, LimitExceededError
from exporters.onnx_file import check_onnx_size

if TYPE_CHECKING:
    from torch import nn

MIN_RUNS = 50


class GraphOptimization(str, Enum):
    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int = 100
    rounds: int = 10  # interleaved rounds (A B, B A, ...): drift within a run hits every model alike
    graph_optimization: GraphOptimization = GraphOptimization.ALL
    spinning: bool = False
    torch_eager: bool = True
    seed: int = 0
    max_input_elements: int = 1 << 26  # an ONNX file declares its input size: refuse more than 256 MB of float32
    max_run_seconds: float = 60.0  # a single run (the first warm-up) longer than this is stopped: a file may loop
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime execution providers, in priority order
    duration_s: float | None = (
        None  # duration mode: time each model for about this long per setting (runs is then a minimum)
    )
    free_dimensions: tuple[
        tuple[str, int], ...
    ] = ()  # symbolic input dimensions fixed by name (batch stays batch_sizes)

    def __post_init__(self) -> None:
        if self.runs < MIN_RUNS:
            raise InvalidInputError(f"runs must be >= {MIN_RUNS} for a trustworthy median (got {self.runs})")
        if self.rounds < 1 or self.warmup < 0 or not self.batch_sizes or not self.threads:
            raise InvalidInputError(
                "rounds >= 1, warmup >= 0 and at least one batch size and thread count are required"
            )
        if not (self.max_run_seconds > 0) or not self.providers:
            raise InvalidInputError("max_run_seconds must be > 0 and at least one execution provider is required")
        object.__setattr__(self, "providers", tuple(self.providers))
        if min(self.batch_sizes) < 1 or min(self.threads) < 1:
            raise InvalidInputError(
                f"batch sizes and thread counts must be >= 1, got {self.batch_sizes} and {self.threads}"
            )
        object.__setattr__(self, "graph_optimization", GraphOptimization(self.graph_optimization))
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise InvalidInputError(f"duration_s must be a positive number of seconds, got {self.duration_s}")
        dims = tuple(
            (str(name), int(value))
            for name, value in (dict(self.free_dimensions) if self.free_dimensions else {}).items()
        )
        if any(value < 1 for _, value in dims):
            raise InvalidInputError(f"free dimension overrides must be >= 1, got {dict(dims)}")
        object.__setattr__(self, "free_dimensions", dims)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["graph_optimization"] = self.graph_optimization.value
        d["providers"] = list(self.providers)
        d["free_dimensions"] = [list(pair) for pair in self.free_dimensions]
        return d


@dataclass
class Timing:
    model: str
    engine: str  # "onnxruntime" or "torch"
    batch: int
    threads: int
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    min_ms: float
    round_medians_ms: list[float]
    p95_ms: float | None = None
    p99_ms: float | None = None
    iqr_ms: float | None = None  # spread: 75th minus 25th percentile
    samples_ms: list[float] | None = None  # every timed run, in order (for distributions and re-analysis)


@dataclass
class ModelInfo:
    name: str
    onnx_path: str
    file_bytes: int
    params: int | None  # None where the onnx package (which counts them) is not installed
    macs: int | None


@dataclass
class BenchReport:
    config: BenchConfig
    environment: dict
    models: list[ModelInfo]
    timings: list[Timing] = field(default_factory=list)

    def timing(self, model: str, engine: str, batch: int, threads: int) -> Timing:
        for t in self.timings:
            if (t.model, t.engine, t.batch, t.threads) == (model, engine, batch, threads):
                return t
        raise KeyError((model, engine, batch, threads))

    def ratio(self, b: str, a: str, engine: str = "onnxruntime", batch: int = 1, threads: int = 1) -> float:
        """Median latency of ``b`` over that of ``a`` (measured interleaved in the same run)."""
        return self.timing(b, engine, batch, threads).median_ms / self.timing(a, engine, batch, threads).median_ms

    def call_overhead_ms(self, engine: str, batch: int, threads: int) -> float | None:
        """The median time of an onnxruntime call that does nothing but copy the input, at this batch
        size and thread count; None for PyTorch timings and where it was not measured."""
        if engine != "onnxruntime":
            return None
        return (self.environment.get("call_overhead_ms") or {}).get(_cell_key(batch, threads))

    def net_ratio(self, b: str, a: str, engine: str = "onnxruntime", batch: int = 1, threads: int = 1) -> float | None:
        """``ratio`` with the call overhead taken off both medians (None where it was not measured
        or is not below both)."""
        overhead = self.call_overhead_ms(engine, batch, threads)
        tb, ta = self.timing(b, engine, batch, threads).median_ms, self.timing(a, engine, batch, threads).median_ms
        if overhead is None or overhead >= min(ta, tb):
            return None
        return (tb - overhead) / (ta - overhead)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "environment": self.environment,
            "models": [asdict(m) for m in self.models],
            "timings": [asdict(t) for t in self.timings],
            "ratios": self.ratios(),
        }

    def ratios(self) -> list[dict]:
        """Every model against the first one, per engine, batch and thread count."""
        if len(self.models) < 2:
            return []
        base = self.models[0]
        out = []
        for m in self.models[1:]:
            for t in self.timings:
                if t.model != m.name:
                    continue
                try:
                    ref = self.timing(base.name, t.engine, t.batch, t.threads)
                except KeyError:  # e.g. a PyTorch timing of a model whose baseline was timed in ONNX only
                    continue
                out.append(
                    {
                        "model": m.name,
                        "baseline": base.name,
                        "engine": t.engine,
                        "batch": t.batch,
                        "threads": t.threads,
                        "latency_ratio": t.median_ms / ref.median_ms,
                        "latency_ratio_ci95": ratio_interval(t.samples_ms, ref.samples_ms, seed=self.config.seed),
                        "latency_ratio_net": self.net_ratio(m.name, base.name, t.engine, t.batch, t.threads),
                        "macs_ratio": m.macs / base.macs if base.macs and m.macs is not None else None,
                        "params_ratio": m.params / base.params if base.params and m.params is not None else None,
                        "size_ratio": m.file_bytes / base.file_bytes,
                    }
                )
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BenchReport:
        """A report written by ``to_dict`` (e.g. on the target device), for rendering on the host."""
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), t)
            for k, t in (("config", dict), ("environment", dict), ("models", list), ("timings", list))
        ):
            raise InvalidInputError(
                "not a benchmark report written by exporters.latency (it needs config, environment, models and timings)"
            )
        if not data["models"] or not data["timings"]:
            raise InvalidInputError("the benchmark report holds no models or no timings")
        overhead = data["environment"].get("call_overhead_ms")
        if overhead is not None and not (
            isinstance(overhead, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in overhead.values())
        ):
            raise InvalidInputError("the benchmark report's call_overhead_ms is not a map of numbers")
        try:
            config = BenchConfig(**{k: _tuples(v) for k, v in data["config"].items()})
            return cls(
                config,
                dict(data["environment"]),
                [ModelInfo(**m) for m in data["models"]],
                [Timing(**t) for t in data["timings"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInputError(
                f"not a benchmark report written by exporters.latency ({type(exc).__name__}: {exc})"
            ) from exc

    def to_markdown(self) -> str:
        lines = [
            "| model | engine | batch | threads | median ms | IQR ms | p90 ms | p99 ms | CV | runs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in self.timings:
            spread = "-" if t.iqr_ms is None else f"{t.iqr_ms:.3f}"
            p99 = "-" if t.p99_ms is None else f"{t.p99_ms:.3f}"
            lines.append(
                f"| {t.model} | {t.engine} | {t.batch} | {t.threads} | {t.median_ms:.3f} | {spread} | {t.p90_ms:.3f} | "
                f"{p99} | {t.cv:.3f} | {t.runs} |"
            )
        info = ["", "| model | params | MACs | ONNX bytes |", "|---|---|---|---|"]
        info += [f"| {m.name} | {_number(m.params)} | {_number(m.macs)} | {m.file_bytes:,} |" for m in self.models]
        lines += info
        if self.ratios():
            lines += [
                "",
                f"Ratios against `{self.models[0].name}` (measured interleaved in one run):",
                "",
                "| model | engine | batch | threads | latency ratio (95% CI) | net of call overhead | MACs ratio | params ratio | size ratio |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.ratios():
                lines.append(
                    f"| {r['model']} | {r['engine']} | {r['batch']} | {r['threads']} | {r['latency_ratio']:.3f}{_interval(r)} | "
                    f"{_number(r.get('latency_ratio_net'), '.3f')} | {_number(r['macs_ratio'], '.3f')} | "
                    f"{_number(r['params_ratio'], '.3f')} | {r['size_ratio']:.3f} |"
                )
        env = self.environment
        timed = (
            f"at least {self.config.runs} runs over about {self.config.duration_s:g} s"
            if self.config.duration_s
            else f"{self.config.runs} timed runs"
        )
        overhead = env.get("call_overhead_ms") or {}
        if overhead:
            cells = ", ".join(f"{k}: {v:.4f} ms" for k, v in overhead.items())
            lines += ["", f"onnxruntime call overhead (a graph that only copies the input; batch x threads): {cells}."]
        lines += [
            "",
            f"Machine: {env.get('cpu', '?')} ({env.get('cores', '?')} cores); onnxruntime {env.get('onnxruntime', '?')}, torch {env.get('torch', '?')}; "
            f"providers {', '.join(self.config.providers)}; graph optimisation {self.config.graph_optimization.value}, "
            f"spinning {'on' if self.config.spinning else 'off'}, {self.config.warmup} warm-up + {timed} in "
            f"{self.config.rounds} interleaved rounds.",
        ]
        return "\n".join(lines)


def ratio_interval(
    samples: list[float] | None, baseline: list[float] | None, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """A 95% bootstrap interval of the ratio of median latencies (``samples`` over ``baseline``):
    both sets of timed runs are resampled with replacement and the ratio's 2.5th and 97.5th
    percentiles taken. None for reports written without the samples."""
    if not samples or not baseline:
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(samples), np.asarray(baseline)
    ratios = np.median(rng.choice(a, (resamples, len(a))), axis=1) / np.median(
        rng.choice(b, (resamples, len(b))), axis=1
    )
    return [float(v) for v in np.percentile(ratios, [2.5, 97.5])]


def _interval(ratio: dict) -> str:
    ci = ratio.get("latency_ratio_ci95")
    return "" if ci is None else f" ({ci[0]:.3f}-{ci[1]:.3f})"


def _cell_key(batch: int, threads: int) -> str:
    return f"{batch}x{threads}"


def _tuples(value):
    """JSON lists back to the tuples ``BenchConfig`` holds (nested for free-dimension pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _number(value: float | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def _environment() -> dict:
    import onnxruntime as ort

    from ccpurify.provenance import machine

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        **machine(),
        "onnxruntime": ort.__version__,
        "torch": torch_version,
        "python": platform.python_version(),
        "available_providers": ort.get_available_providers(),
    }


def _session(path: str | bytes, threads: int, config: BenchConfig):
    import onnxruntime as ort

    level = {
        GraphOptimization.DISABLE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.graph_optimization]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    for name, value in config.free_dimensions:
        options.add_free_dimension_override_by_name(name, value)
    missing = [p for p in config.providers if p not in ort.get_available_providers()]
    if missing:
        raise InvalidInputError(
            f"execution provider(s) {missing} are not in this onnxruntime; available: {ort.get_available_providers()}"
        )
    try:
        return ort.InferenceSession(path, options, providers=list(config.providers))
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
        raise InvalidInputError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from exc


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch in inference mode at ``threads`` intra-op threads (restored after), or None when no
    PyTorch model is timed: only then is torch imported."""
    if threads is None:
        yield None
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield torch
    finally:
        torch.set_num_threads(previous)


def _first_run_bounded(name: str, run, seconds: float):
    """Run once with a watchdog and return the outputs: onnxruntime stops a run whose ``terminate``
    flag is set, so a file whose graph loops (or is just far too slow) cannot hold the benchmark forever."""
    import onnxruntime as ort

    options = ort.RunOptions()
    timer = threading.Timer(seconds, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        return run(options)
    except Exception as exc:
        if options.terminate:
            raise LimitExceededError(
                f"{name}: one run took more than {seconds:g} s and was stopped; if the model is that slow, raise "
                "BenchConfig(max_run_seconds=...)"
            ) from exc
        raise InvalidInputError(f"{name}: onnxruntime cannot run it ({str(exc).splitlines()[0][:200]})") from exc
    finally:
        timer.cancel()


def _bound_run(session, x: np.ndarray, outputs: list[np.ndarray]):
    """A zero-argument call running ``session`` on ``x`` through an IOBinding: the input and every
    output are bound once to preallocated buffers (shaped like ``outputs``, those of one plain run
    on ``x``), so a call times onnxruntime and not numpy conversion or output allocation."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, x)
    buffers = [np.empty_like(o) for o in outputs]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    for meta, value in zip(session.get_outputs(), values):
        binding.bind_ortvalue_output(meta.name, value)

    def run(keep=(x, buffers, values)) -> None:  # older onnxruntime keeps no reference: the call does
        session.run_with_iobinding(binding)

    return run


def _copy_graph(shape: tuple[int, ...]) -> bytes | None:
    """A serialized ONNX graph whose one float input (batch, *shape) is copied to its output: what
    an onnxruntime call costs when the model does nothing. None without the onnx package."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    dims = ["batch", *shape]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "call_overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _summarise(model: str, engine: str, batch: int, threads: int, rounds: list[list[float]]) -> Timing:
    samples = np.array([s for r in rounds for s in r]) * 1e3
    return Timing(
        model=model,
        engine=engine,
        batch=batch,
        threads=threads,
        runs=len(samples),
        median_ms=float(np.median(samples)),
        p90_ms=float(np.percentile(samples, 90)),
        mean_ms=float(samples.mean()),
        cv=float(samples.std() / samples.mean()),
        min_ms=float(samples.min()),
        round_medians_ms=[float(np.median(r) * 1e3) for r in rounds],
        p95_ms=float(np.percentile(samples, 95)),
        p99_ms=float(np.percentile(samples, 99)),
        iqr_ms=float(np.subtract(*np.percentile(samples, [75, 25]))),
        samples_ms=[round(float(v), 5) for v in samples],
    )


def _input_shape(session, path: str | os.PathLike, config: BenchConfig) -> tuple[int, ...]:
    """The per-example input shape an ONNX file declares (symbolic dimensions: their free-dimension
    override, else 1), checked against ``config.max_input_elements`` at the largest batch before any
    input is allocated."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InvalidInputError(f"{path}: the benchmark feeds one input tensor; the model declares {len(inputs)}")
    if inputs[0].type != "tensor(float)":
        raise InvalidInputError(f"{path}: the benchmark feeds float32 images; this model's input is {inputs[0].type}")
    overrides = dict(config.free_dimensions)
    batch = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(batch, str) and batch in overrides:
        raise InvalidInputError(
            f"{path}: {batch!r} is the batch dimension; set it with batch_sizes (--batch-sizes), not a free-dimension override"
        )
    shape = tuple(d if isinstance(d, int) else overrides.get(d, 1) for d in inputs[0].shape[1:])
    if any(d < 1 for d in shape):
        raise InvalidInputError(f"{path}: the input declares a non-positive dimension {shape}")
    elements = max(config.batch_sizes) * math.prod(shape)
    if elements > config.max_input_elements:
        raise LimitExceededError(
            f"{path}: an input of batch {max(config.batch_sizes)} x {list(shape)} has {elements:,} elements, above the "
            f"limit of {config.max_input_elements:,}; if you trust the file, raise BenchConfig(max_input_elements=...)"
        )
    return shape


def _graph_cost(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """Params and MACs read off the graph, or (None, None) where the onnx package is not installed."""
    try:
        from exporters.graph_cost import onnx_cost
        from exporters.onnx_file import load_onnx
    except ImportError:
        return None, None
    proto = load_onnx(path)
    try:
        cost = onnx_cost(proto)
    except Exception as exc:  # shape inference rejects unknown ops, domains and opsets in many ways
        raise InvalidInputError(
            f"{path}: the graph cannot be analysed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from exc
    return cost.params, cost.macs


def _timed_rounds(fns: Mapping[str, callable], config: BenchConfig) -> dict[str, list[list[float]]]:
    """Run every function in interleaved rounds (A B, B A, ...): ``runs`` calls each in all, or, in
    duration mode, calls until ``duration_s / rounds`` seconds have passed in each round (at least
    ``runs / rounds`` calls)."""
    per_round = max(1, -(-config.runs // config.rounds))
    budget = config.duration_s / config.rounds if config.duration_s else None
    samples = {n: [] for n in fns}
    for r in range(config.rounds):
        for n in list(fns) if r % 2 == 0 else list(reversed(list(fns))):
            fn, times, started = fns[n], [], time.perf_counter()
            while len(times) < per_round or (budget is not None and time.perf_counter() - started < budget):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            samples[n].append(times)
    return samples


def _call_overhead(x: np.ndarray, threads: int, config: BenchConfig) -> float | None:
    """Median milliseconds of a bound onnxruntime call on a graph that only copies ``x`` (as many
    calls as one model gets), or None without the onnx package."""
    graph = _copy_graph(x.shape[1:])
    if graph is None:
        return None
    session = _session(graph, threads, replace(config, free_dimensions=()))
    run = _bound_run(session, x, [x])  # the copy's output is shaped like its input
    for _ in range(config.warmup):
        run()
    (rounds,) = _timed_rounds({"overhead": run}, replace(config, duration_s=None)).values()
    return _summarise("overhead", "onnxruntime", len(x), threads, rounds).median_ms


def _check_free_dimensions(
    config: BenchConfig, declared: dict[str, set[str]], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Refuse a free-dimension override no model declares (a typo would time the default size), and
    one that only some models declare when it leaves them timed on differently shaped inputs."""
    symbolic = set().union(*declared.values())
    if unknown := sorted(set(dict(config.free_dimensions)) - symbolic):
        raise InvalidInputError(
            f"no model has a symbolic input dimension named {', '.join(unknown)}; theirs: "
            f"{', '.join(sorted(symbolic)) or 'none'} (the batch is set with batch_sizes / --batch-sizes)"
        )
    if len(set(shapes.values())) > 1:
        for dim in dict(config.free_dimensions):
            if lacking := [n for n, names in declared.items() if dim not in names]:
                raise InvalidInputError(
                    f"{', '.join(lacking)} do(es) not declare the input dimension {dim!r}, so the models would be timed on "
                    f"different inputs ({'; '.join(f'{n}: {list(s)}' for n, s in shapes.items())}); "
                    "benchmark them separately or export them with the same dynamic dimensions"
                )


def benchmark(
    models: Mapping[str, str | os.PathLike],
    config: BenchConfig | None = None,
    torch_models: Mapping[str, nn.Module] | None = None,
    progress=None,
) -> BenchReport:
    """Time every ONNX file in ``models`` (name -> path), interleaved, per batch size and thread count.

    ``torch_models`` (same names) adds PyTorch eager timings of the matching modules.
    """
    config = config or BenchConfig()
    infos, shapes, declared = [], {}, {}
    for name, path in models.items():
        probe = _session(os.fspath(path), 1, replace(config, free_dimensions=()))  # sees the symbolic names
        shapes[name] = _input_shape(probe, path, config)
        declared[name] = {d for d in probe.get_inputs()[0].shape[1:] if isinstance(d, str)}
        params, macs = _graph_cost(path)
        infos.append(ModelInfo(name, os.fspath(path), check_onnx_size(path), params, macs))
    _check_free_dimensions(config, declared, shapes)
    report = BenchReport(config, _environment(), infos)
    rng = np.random.default_rng(config.seed)
    names = list(models)
    cells = [(b, t) for b in config.batch_sizes for t in config.threads]
    for cell_index, (batch, threads) in enumerate(cells):
        inputs = {n: rng.standard_normal((batch, *shapes[n])).astype(np.float32) for n in names}
        engines: dict[str, dict[str, callable]] = {"onnxruntime": {}}
        for n in names:
            sess = _session(os.fspath(models[n]), threads, config)
            feed = {sess.get_inputs()[0].name: inputs[n]}
            outputs = _first_run_bounded(n, lambda o, s=sess, f=feed: s.run(None, f, o), config.max_run_seconds)
            engines["onnxruntime"][n] = _bound_run(sess, inputs[n], outputs)
        overhead = _call_overhead(inputs[names[0]], threads, config)
        if overhead is not None:
            report.environment.setdefault("call_overhead_ms", {})[_cell_key(batch, threads)] = overhead
        with _torch_threads(threads if config.torch_eager and torch_models else None) as torch:
            if torch is not None:
                engines["torch"] = {}
                for n in names:
                    if n in torch_models:
                        module, x = torch_models[n].eval(), torch.from_numpy(inputs[n])
                        engines["torch"][n] = lambda m=module, xx=x: m(xx)
            for engine, fns in engines.items():
                for fn in fns.values():
                    for _ in range(config.warmup):
                        fn()
                for n, rounds in _timed_rounds(fns, config).items():
                    report.timings.append(_summarise(n, engine, batch, threads, rounds))
        if progress is not None:
            from ccpurify.progress import report as send

            send(progress, "benchmark", cell_index + 1, len(cells))
    return report


def _free_dimension(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.strip().isdigit():
        raise InvalidInputError(f"--free-dim takes NAME=VALUE with a positive integer value, got {text!r}")
    return name, int(value)


def add_options(parser) -> None:
    """The benchmark's settings as command-line options (``python -m exporters.latency`` and
    ``ccpurify bench``), one per ``BenchConfig`` field, with its defaults."""
    parser.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[1], help="batch sizes (default: 1)")
    parser.add_argument(
        "--threads", type=at_least(1), nargs="+", default=[1], help="intra-op thread counts (default: 1)"
    )
    parser.add_argument(
        "--runs",
        type=at_least(MIN_RUNS),
        default=100,
        help=f"timed runs per model and setting, at least {MIN_RUNS} (default: 100)",
    )
    parser.add_argument("--warmup", type=at_least(0), default=10, help="untimed warm-up runs (default: 10)")
    parser.add_argument(
        "--rounds", type=at_least(1), default=10, help="interleaved rounds the runs are split into (default: 10)"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=["CPUExecutionProvider"],
        help="onnxruntime execution providers in priority order (default: CPUExecutionProvider)",
    )
    parser.add_argument(
        "--graph-optimization",
        choices=[g.value for g in GraphOptimization],
        default="all",
        help="onnxruntime graph optimisation level (default: all)",
    )
    parser.add_argument(
        "--spinning",
        action="store_true",
        help="let onnxruntime threads spin while waiting (off by default: slower on small VMs)",
    )
    parser.add_argument(
        "--max-run-seconds", type=positive_seconds, default=60.0, help="stop a single run after this long (default: 60)"
    )
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="duration mode: time each model for about this long per setting (--runs is then a minimum)",
    )
    parser.add_argument(
        "--free-dim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fix a symbolic input dimension by name, e.g. height=224 (repeatable)",
    )


def config_from_options(args, torch_eager: bool = False) -> BenchConfig:
    """The ``BenchConfig`` that ``add_options``' parsed options describe (checked by BenchConfig)."""
    return BenchConfig(
        batch_sizes=tuple(args.batch_sizes),
        threads=tuple(args.threads),
        warmup=args.warmup,
        runs=args.runs,
        rounds=args.rounds,
        graph_optimization=args.graph_optimization,
        spinning=args.spinning,
        torch_eager=torch_eager,
        max_run_seconds=args.max_run_seconds,
        providers=tuple(args.providers),
        duration_s=args.duration,
        free_dimensions=tuple(_free_dimension(text) for text in args.free_dim),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m exporters.latency A.onnx [B.onnx ...]``: time ONNX files on this device, interleaved,
    with onnxruntime and numpy only; print the table, write the JSON report for the host to read."""
    import argparse
    import sys
    from pathlib import Path

    from ccpurify.errors import CcpurifyError

    p = argparse.ArgumentParser(prog="python -m exporters.latency", description=main.__doc__)
    p.add_argument(
        "models", nargs="+", metavar="MODEL.onnx", help="ONNX files; the first is the baseline of the ratios"
    )
    add_options(p)
    p.add_argument("--out", default=None, help="write the JSON report here (refused if it exists)")
    args = p.parse_args(argv)
    try:
        if args.out and Path(args.out).exists():
            raise InvalidInputError(f"{args.out} exists; choose another path")
        names = [
            Path(m).stem if Path(m).stem not in [Path(x).stem for x in args.models[:i]] else f"{Path(m).stem}-{i}"
            for i, m in enumerate(args.models)
        ]
        report = benchmark(dict(zip(names, args.models, strict=True)), config_from_options(args))
    except CcpurifyError as exc:
        print(f"exporters.latency: error: {exc}", file=sys.stderr)
        return 1
    print(report.to_markdown())
    if args.out:
        from ccpurify.atomic import write_json

        write_json(args.out, report.to_dict())
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
