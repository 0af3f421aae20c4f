"""Run every defense on every zoo model and write benchmarks/results/.

    python -m benchmarks.grid                                  # every planned cell not yet run, then the tables
    python -m benchmarks.grid --cell cifar10-badnets:clp       # one cell
    python -m benchmarks.grid --entries cifar10-badnets --defenses clp cc otbr
    python -m benchmarks.grid --tables-only                    # rebuild tables and plot from grid.json
    python -m benchmarks.grid --cell 'cifar10-badnets:sweep:otbr:ratio=0.05'   # one sweep point

For each (zoo entry, defense) cell: the defense runs with the defender resources stored in the run
directory (none; RNP's 500 labelled images; the 5,000-image unlabelled pool; or 5,000 images of
the other dataset for the out-of-distribution BCU variant); CA/ASR/RA/DER on the test split and on
the validation images (training split, unseen by every pass); params and MACs; ONNX latency ratios
at batch 1 / 1 thread and batch 32 / 2 threads and of the INT8 model, measured interleaved with the
undefended model in the same run; and the pass's wall time. Results accumulate in
``results/grid.json``; an interrupted run resumes where it stopped.

The plan (``planned_cells``): every single defense and the three default pipelines on every zoo
model; the other candidate pipelines only on the models the defaults are chosen on
(``SELECTION_ENTRIES``), since a candidate matters only for that choice.

A parameter sweep is a set of grid cells too (``sweep_cell``): ``sweep:PASS:KEY=VALUE;KEY=VALUE``
builds pass PASS by name with those options, on the defender data of the cell named PASS. Sweep
cells are stored in ``grid.json`` like any other (``python -m benchmarks.sweep`` runs them and
writes their table) and stay out of the defense tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    RESULTS,
    ZOO,
    context_for,
    load_entry,
    measure_latency,
    read_json,
    score_pair,
    store_result,
    zoo_entries,
)
from ccpurify import passes
from ccpurify.atomic import write_json, write_text
from ccpurify.passes import BCU, CLP, OTBR, PASSES, RNP, CleanCompact, Pass, Pipeline, Prune
from ccpurify.passes.defaults import (
    ASR_GOAL,
    CA_TIE,
    CANDIDATES,
    DEFAULTS,
    DER_TIE,
    LATENCY_GOAL,
    MACS_GOAL,
    MACS_TARGETS,
    data_robust_rank,
    key,
    ranked_rnp,
)
from ccpurify.provenance import PROTOCOL_VERSION, git_commit, machine, now, versions

ATTACK_ORDER = ["badnets", "blended", "wanet", "sig", "lf", "input_aware", "clean"]
# The zoo models on which the candidate pipelines are compared (ccpurify.passes.defaults): the same
# three attacks on both datasets and on every architecture (issue 14, item 3). A default chosen on
# CIFAR-10 alone let GTSRB backdoors through; one chosen on PreAct-ResNet18 alone (sessions 10-15)
# let VGG16-BN and MobileNetV2 ones back (session 16: twice the data-free recovery tied on the PreAct
# models, and took MobileNetV2 WaNet's test ASR from 51 to 87%). The other attacks (SIG, LF,
# Input-aware) and the clean models are held out: their cells show how the chosen default transfers.
SELECTION_ENTRIES = (
    "cifar10-badnets",
    "cifar10-blended",
    "cifar10-wanet",
    "gtsrb-badnets",
    "gtsrb-blended",
    "gtsrb-wanet",
    "cifar10-vgg16_bn-badnets",
    "cifar10-vgg16_bn-blended",
    "cifar10-vgg16_bn-wanet",
    "cifar10-mobilenet_v2-badnets",
    "cifar10-mobilenet_v2-blended",
    "cifar10-mobilenet_v2-wanet",
)


@dataclass(frozen=True)
class Cell:
    data: str  # "none", "clean", "unlabeled" or "unlabeled_ood"
    build: Callable[[], Pass | Pipeline]
    label: str


CELLS: dict[str, Cell] = {
    "clp-reference": Cell(
        "none", lambda: CLP(mode="faithful", reference_pairing=True), "CLP faithful, reference module-order pairing"
    ),
    "clp-faithful": Cell("none", lambda: CLP(mode="faithful"), "CLP faithful (zero gamma, beta), graph pairing"),
    "clp": Cell("none", lambda: CLP(), "CLP compress: physical removal, group policy"),
    "cc": Cell("none", lambda: CleanCompact(), "C&C (reconstructed), frozen default"),
    "otbr": Cell("none", lambda: OTBR(), "OTBR, ratio 0.10"),
    "otbr-compact": Cell("none", lambda: OTBR(compact=True), "OTBR compact: top-NWC neurons removed"),
    "rnp": Cell("clean", lambda: RNP(), "RNP, 500 labelled images, threshold 0.2, physical removal"),
    "rnp-faithful": Cell("clean", lambda: RNP(mode="faithful"), "RNP faithful (gamma only)"),
    "rnp-ranked": Cell("clean", ranked_rnp, "RNP, 5% of channels with the lowest mean mask over the recovery steps"),
    "rnp-auto": Cell(
        "clean", lambda: RNP(threshold="auto"), "RNP, threshold chosen on a held-out part of the 500 images"
    ),
    "bcu": Cell("unlabeled", lambda: BCU(), "BCU, 5,000 unlabelled images, 20 epochs"),
    "bcu-ood": Cell("unlabeled_ood", lambda: BCU(), "BCU on 5,000 images of the other dataset"),
    "bcu-compact": Cell("unlabeled", lambda: BCU(compact=Prune(macs=0.5)), "BCU with a 50%-MACs pruned student"),
    **{
        f"pipeline:{key(name, macs)}": Cell(kind, partial(builder, macs), f"pipeline {name} at {macs:g} of the MACs")
        for name, (kind, builder) in CANDIDATES.items()
        for macs in MACS_TARGETS
    },
}


SWEEP_PREFIX = "sweep:"


def sweep_cell(pass_name: str, options: dict) -> str:
    """The grid name of pass ``pass_name`` run with ``options`` (values as JSON):
    ``sweep:otbr:ratio=0.05``, options sorted by name. ``;`` separates the options, so a value
    whose JSON holds one is refused rather than written as a name that parses back differently."""
    items = [f"{k}={json.dumps(v)}" for k, v in sorted(options.items())]
    if bad := [item for item in items if ";" in item]:
        raise ValueError(f"a sweep option cannot contain ';' (it separates the options): {', '.join(bad)}")
    return SWEEP_PREFIX + pass_name + ":" + ";".join(items)


def json_or_text(value: str):
    """A value written as text (a sweep cell, a command line): JSON when it is JSON (numbers,
    booleans, lists), else the string itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_sweep_cell(defense: str) -> tuple[str, dict]:
    """(pass name, options) of a ``sweep_cell`` name."""
    pass_name, _, text = defense[len(SWEEP_PREFIX) :].partition(":")
    options = {}
    for item in filter(None, text.split(";")):
        k, sep, v = item.partition("=")
        if not sep:
            raise KeyError(f"sweep cell {defense!r}: {item!r} is not KEY=VALUE")
        options[k] = json_or_text(v)
    return pass_name, options


def cell_for(defense: str) -> Cell:
    """A named cell of ``CELLS``, or a sweep cell: the pass built by name (``passes.create``, which
    checks every option) with the defender data of the cell of the same name (else none)."""
    if defense in CELLS:
        return CELLS[defense]
    if not defense.startswith(SWEEP_PREFIX):
        raise KeyError(f"unknown defense {defense!r}; known: {', '.join(CELLS)}, or {SWEEP_PREFIX}PASS:KEY=VALUE")
    pass_name, options = parse_sweep_cell(defense)
    data = CELLS[pass_name].data if pass_name in CELLS else "none"
    passes.create(pass_name, **options)  # an unknown pass or option fails here, before any work
    return Cell(data, partial(passes.create, pass_name, **options), f"{pass_name} with {options}")


@torch.no_grad()
def noise_entropy(model: torch.nn.Module, shape: tuple[int, ...], count: int = 512, seed: int = 0) -> float:
    """Mean prediction entropy (nats) on uniform noise in [0, 1), the input OTBR unlearns on (a
    backdoored model tends to send noise to its target class)."""
    x = torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))
    p = model.eval()(x).softmax(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def default_cells() -> set[str]:
    """The grid's names of the default pipelines (ccpurify.passes.defaults.DEFAULTS)."""
    return {f"pipeline:{key(d.name, d.macs)}" for d in DEFAULTS.values()}


def planned_cells(entries: list[str]) -> list[tuple[str, str]]:
    """(entry, defense) pairs a plain ``python -m benchmarks.grid`` runs: single defenses and the
    default pipelines everywhere, every candidate pipeline on the selection entries."""
    defaults = default_cells()
    return [
        (e, d)
        for e in entries
        for d in CELLS
        if not d.startswith("pipeline:") or d in defaults or e in SELECTION_ENTRIES
    ]


def as_pipeline(built: Pass | Pipeline) -> Pipeline:
    return built if isinstance(built, Pipeline) else Pipeline([built])


def recipe(pipeline: Pipeline) -> list[dict]:
    """A cell's passes and their parameters: a stored cell whose recipe differs is stale and rerun."""
    return [{"name": p.name, "config": p.config()} for p in pipeline.passes]


def run_cell(entry, defense: str, latency: bool) -> dict:
    cell = cell_for(defense)
    context = context_for(entry, cell.data)
    pipeline = as_pipeline(cell.build())
    started = time.perf_counter()
    out, report = pipeline(entry.model, context)
    wall = time.perf_counter() - started
    result = {
        "entry": entry.name,
        "dataset": entry.dataset,
        "attack": entry.attack,
        "defense": defense,
        "label": cell.label,
        "data": cell.data,
        "recipe": recipe(pipeline),
        "wall_time_s": wall,
        **score_pair(entry, entry.model, out),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "params_ratio": report.params_after / report.params_before,
        "macs_ratio": report.macs_after / report.macs_before,
        "noise_entropy": noise_entropy(out, tuple(entry.example_inputs.shape[1:])),
        "passes": [
            {
                "name": p.name,
                "config": p.config,
                "wall_time_s": p.wall_time_s,
                "details": {
                    k: v
                    for k, v in p.details.to_dict().items()
                    if k not in ("layers", "masks", "removal", "ratios", "replaced")
                },
            }
            for p in report.passes
        ],
    }
    if latency:
        result["latency"] = measure_latency(entry, entry.model, out)
    return result


EMPTY_GRID = {"cells": {}, "baselines": {}}


def same_config(old: dict, new: dict, defaults: dict) -> bool:
    """Whether a stored pass configuration ``old`` runs as ``new`` does. A parameter ``old`` lacks is
    an option added since; at its default it keeps the behaviour the cell ran with (design.md: an
    improvement is a named option, off by default), so it does not make the cell stale. A nested
    pass (e.g. BCU's ``compact`` Prune) is compared the same way against its own defaults."""
    for k, value in new.items():
        if k not in old:
            if value != defaults.get(k):
                return False
        elif isinstance(value, dict) and isinstance(old[k], dict) and "name" in value:
            nested = PASSES.create(value["name"]).config() if value["name"] in PASSES.list() else {}
            if not same_config(old[k], value, nested):
                return False
        elif old[k] != value:
            return False
    return set(old) <= set(new)


def same_recipe(stored: list[dict], pipeline: Pipeline) -> bool:
    """Whether a stored cell ran the recipe ``pipeline`` runs now (``same_config`` pass by pass)."""
    current = recipe(pipeline)
    if [s["name"] for s in stored] != [c["name"] for c in current]:
        return False
    return all(
        same_config(old["config"], new["config"], default_config(step))
        for old, new, step in zip(stored, current, pipeline.passes)
    )


def default_config(step: Pass) -> dict:
    """The configuration of ``step``'s pass with every option at its default; empty for a pass that
    has required options (``Fallback``'s nested passes: compared through their own ``name``)."""
    try:
        return type(step)().config()
    except TypeError:
        return {}


def is_stale(stored: dict | None, defense: str) -> bool:
    try:
        cell = cell_for(defense)
    except (KeyError, ValueError):
        return True
    return stored is None or not same_recipe(stored.get("recipe", []), as_pipeline(cell.build()))


def run(args, tables: bool = True) -> dict:
    """Run the cells ``args`` names (or the plan) that are missing or stale; returns the grid."""
    grid_file = RESULTS / "grid.json"
    grid = read_json(grid_file, EMPTY_GRID)
    entries = args.entries or zoo_entries(Path(args.zoo))
    todo = [(e, d) for e in entries for d in args.defenses] if args.defenses else planned_cells(entries)
    if args.cell is not None:
        if not args.cell:
            raise SystemExit("no cells given: name them as ENTRY:DEFENSE")
        if bad := [c for c in args.cell if ":" not in c]:
            raise SystemExit(f"a cell is ENTRY:DEFENSE, got {bad[0]!r}")
        todo = [tuple(c.split(":", 1)) for c in args.cell]
    known = set(zoo_entries(Path(args.zoo)))
    for entry_name, defense in todo:  # every cell is checked before any work
        if entry_name not in known:
            raise SystemExit(f"no zoo entry {entry_name!r} in {args.zoo}; known: {', '.join(sorted(known))}")
        try:
            cell_for(defense)
        except (KeyError, ValueError) as exc:
            raise SystemExit(str(exc).strip('"')) from None
    for name in dict.fromkeys(e for e, _ in todo):
        cells = [d for e, d in todo if e == name and (args.redo or is_stale(grid["cells"].get(f"{e}|{d}"), d))]
        if not cells and name in grid["baselines"]:
            continue
        entry = load_entry(name, Path(args.zoo), args.data)
        if name not in grid["baselines"]:
            s = score_pair(entry, entry.model, entry.model)
            baseline = {"dataset": entry.dataset, "attack": entry.attack, "test": s["test"], "val": s["val"]}
            grid = store_result(grid_file, EMPTY_GRID, "baselines", name, baseline)
        for defense in cells:
            if not args.redo and not is_stale(
                read_json(grid_file, EMPTY_GRID)["cells"].get(f"{name}|{defense}"), defense
            ):
                print(
                    f"{time.strftime('%H:%M:%S')} {name} x {defense}: stored meanwhile by another process, skipped",
                    flush=True,
                )
                continue
            print(f"{time.strftime('%H:%M:%S')} {name} x {defense} ...", flush=True)
            result = run_cell(entry, defense, latency=not args.no_latency)
            meta = {
                "protocol": PROTOCOL_VERSION,
                "updated": now(),
                "git_commit": git_commit(),
                "versions": versions(),
                "machine": machine(),
                "seed": 0,
            }
            grid = store_result(grid_file, EMPTY_GRID, "cells", f"{name}|{defense}", result, meta=meta)
            t = result["test"]
            asr = "-" if t["asr"] is None else f"{100 * t['asr']:.1f}"
            print(
                f"    CA {100 * t['ca']:.1f} ASR {asr} MACs x{result['macs_ratio']:.2f} ({result['wall_time_s']:.0f} s)",
                flush=True,
            )
    if tables:
        write_tables(grid)
    return grid


# ----------------------------------------------------------------------------------------- tables
def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def write_tables(grid: dict) -> None:
    cells, baselines = grid["cells"], grid["baselines"]
    meta = grid.get("meta", {})
    commit = (meta.get("git_commit") or "unknown")[:10]
    footer = (
        f"\n\nProtocol: {meta.get('protocol', PROTOCOL_VERSION)}; cpu-preset zoo (benchmarks/zoo), seed 0, commit "
        f"`{commit}`, machine: {meta.get('machine', {}).get('cpu', '?')}. Regenerate: `python -m benchmarks.grid`."
    )
    defenses = [d for d in CELLS if any(k.endswith(f"|{d}") for k in cells)]
    sections = []
    for dataset in ("cifar10", "gtsrb"):
        names = sorted(
            (n for n, b in baselines.items() if b["dataset"] == dataset),
            key=lambda n: ATTACK_ORDER.index(baselines[n]["attack"]),
        )
        if not names:
            continue
        ran = [d for d in defenses if any(f"{n}|{d}" in cells for n in names)]  # columns with a cell on this dataset
        header = "| attack | none | " + " | ".join(ran) + " |"
        lines = [f"## {dataset}: CA / ASR / DER (%, test split)", "", header, "|" + "---|" * (len(ran) + 2)]
        for n in names:
            b = baselines[n]["test"]
            row = [baselines[n]["attack"], f"{pct(b['ca_before'])} / {pct(b['asr_before'])}"]
            for d in ran:
                c = cells.get(f"{n}|{d}")
                row.append(
                    "" if c is None else f"{pct(c['test']['ca'])} / {pct(c['test']['asr'])} / {pct(c['test']['der'])}"
                )
            lines.append("| " + " | ".join(row) + " |")
        mean_row = ["**mean DER** (attacks)", ""]
        for d in ran:
            mean_row.append(pct(mean(cells[f"{n}|{d}"]["test"]["der"] for n in names if f"{n}|{d}" in cells)))
        lines.append("| " + " | ".join(mean_row) + " |")
        text = "\n".join(lines) + footer
        write_text(RESULTS / f"{dataset}.md", text + "\n")
        sections.append(text)
    write_text(RESULTS / "compactness.md", compactness_table(cells, defenses) + footer + "\n")
    write_text(RESULTS / "cells.md", cells_table(cells, baselines, defenses) + footer + "\n")
    write_text(
        RESULTS / "defenses.md",
        "\n".join(f"- `{d}`: {CELLS[d].label} (data: {CELLS[d].data})" for d in defenses) + "\n",
    )
    selection = select_defaults(cells, baselines)
    write_json(RESULTS / "summary.json", {**summary(cells, baselines, defenses), "selection": selection})
    write_text(RESULTS / "default_selection.md", selection_table(selection) + footer + "\n")
    plot(cells, defenses)
    plot_defaults(cells, baselines)


def select_defaults(cells: dict, baselines: dict) -> dict:
    """Apply the rule of ccpurify.passes.defaults to the grid: per kind of data, among the (candidate,
    MACs target) pairs with a cell on every selection entry (``SELECTION_ENTRIES`` present in the
    zoo) that meet the MACs and latency goals, those within ``DER_TIE`` of the best mean validation
    DER, and of these the one with the smallest mean validation CA drop, those whose highest
    validation ASR is at most ``ASR_GOAL`` first (``pick``). A pair with cells on only
    some selection entries is listed as incomplete with what it lacks, not compared: scoring the
    others on fewer models would change their numbers."""
    selection = [n for n in SELECTION_ENTRIES if n in baselines]
    out = {}
    for kind in ("none", "clean", "unlabeled"):
        planned = [key(c, m) for c, (k, _) in CANDIDATES.items() if k == kind for m in MACS_TARGETS]
        missing = {c: [n for n in selection if f"{n}|pipeline:{c}" not in cells] for c in planned}
        complete = [c for c in planned if not missing[c]]
        incomplete = {c: m for c, m in missing.items() if m and len(m) < len(selection)}
        if not selection or not (complete or incomplete):
            continue
        rows = {
            c: candidate_row([cells[f"{n}|pipeline:{c}"] for n in selection], baselines, selection) for c in complete
        }
        eligible = [c for c in rows if rows[c]["eligible"]]
        best = max((rows[c]["mean_der_val"] for c in eligible), default=None)
        tied = [c for c in eligible if rows[c]["mean_der_val"] >= best - DER_TIE]
        chosen = pick(tied, rows)
        out[kind] = {
            "entries": selection,
            "candidates": rows,
            "incomplete": incomplete,
            "not_run": [c for c in planned if c not in complete and c not in incomplete],
            "chosen": chosen,
            "current_default": key(DEFAULTS[kind].name, DEFAULTS[kind].macs),
        }
    return out


def pick(tied: list[str], rows: dict) -> str | None:
    """Of the candidates ``tied`` on mean validation DER, those that leave no backdoor above
    ``ASR_GOAL`` first; of these, those within ``CA_TIE`` of the smallest mean validation CA drop;
    then a candidate whose cost or effect does not grow with the data (``FIXED_BUDGET``'s order);
    then the name."""
    if not tied:
        return None
    clear = [c for c in tied if rows[c]["max_asr_val"] <= ASR_GOAL] or tied
    least = min(rows[c]["mean_ca_drop_val"] for c in clear)
    close = [c for c in clear if rows[c]["mean_ca_drop_val"] <= least + CA_TIE]
    return min(close, key=lambda c: (data_robust_rank(c.split("@")[0]), c))


def validation_summary(done: list[dict]) -> dict:
    """Mean validation DER and CA drop and the highest validation ASR over the cells ``done``."""
    return {
        "mean_der_val": mean(r["val"]["der"] for r in done),
        "mean_ca_drop_val": mean(r["val"]["ca_before"] - r["val"]["ca"] for r in done),
        "max_asr_val": max(r["val"]["asr"] for r in done),
    }


def candidate_row(done: list[dict], baselines: dict, entries: list[str]) -> dict:
    """One candidate's numbers over the selection cells ``done`` (of ``entries``): the validation
    summary over all of them and per dataset, and whether it meets the MACs and latency goals."""
    latency = mean(r.get("latency", {}).get("latency_ratio_bs1_t1") for r in done)
    macs = mean(r["macs_ratio"] for r in done)
    datasets = dict.fromkeys(baselines[n]["dataset"] for n in entries)
    return {
        **validation_summary(done),
        "mean_der_test": mean(r["test"]["der"] for r in done),
        "per_dataset": {
            d: validation_summary([r for r, n in zip(done, entries, strict=True) if baselines[n]["dataset"] == d])
            for d in datasets
        },
        "mean_macs_ratio": macs,
        "mean_latency_ratio_bs1_t1": latency,
        "latency_measured_on": sorted({latency_machine(r) for r in done if "latency" in r}),
        "eligible": macs <= MACS_GOAL + 0.01 and latency is not None and latency <= LATENCY_GOAL,
    }


def latency_machine(cell: dict) -> str:
    """The CPU a cell's latency was measured on, with its vector extension where recorded (since
    session 15): the same pruned widths run at other ratios with AVX-512 than with AVX2."""
    lat = cell["latency"]
    return f"{lat.get('machine', 'unknown')} ({lat.get('simd') or 'vector extension not recorded'})"


def selection_table(selection: dict) -> str:
    lines = [
        "# Default pipelines chosen by the grid",
        "",
        f"Rule (ccpurify/passes/defaults.py): over the selection models (both datasets), among the candidates with a "
        f"MACs ratio <= {MACS_GOAL} and a batch-1 / 1-thread latency ratio <= {LATENCY_GOAL}, those within "
        f"{100 * DER_TIE:g} point of the best mean validation DER; of these, the smallest mean validation CA drop "
        f"(drops within {100 * CA_TIE:g} points of it count as equal: then a fixed-budget candidate, then the name, "
        "alphabetically), "
        f"those whose highest validation ASR is at most {100 * ASR_GOAL:g}% first. "
        "Test DER is shown, never used.",
    ]
    for kind, sel in selection.items():
        datasets = list(next(iter(sel["candidates"].values()))["per_dataset"]) if sel["candidates"] else []
        per = "".join(f" {d} val DER / CA drop / max ASR |" for d in datasets)
        lines += [
            "",
            f"## data: {kind} (over {', '.join(sel['entries'])})",
            "",
            "| candidate @ MACs target | mean val DER | val CA drop | max val ASR |"
            + per
            + " mean test DER | MACs | latency b1/t1 | latency measured on | eligible |",
            "|---|---|---|---|" + "---|" * len(datasets) + "---|---|---|---|---|",
        ]
        for c, r in sel["candidates"].items():
            lat = "-" if r["mean_latency_ratio_bs1_t1"] is None else f"{r['mean_latency_ratio_bs1_t1']:.2f}"
            mark = "**chosen**" if c == sel["chosen"] else ("yes" if r["eligible"] else "no")
            cols = "".join(
                f" {pct(p['mean_der_val'])} / {pct(p['mean_ca_drop_val'])} / {pct(p['max_asr_val'])} |"
                for p in r["per_dataset"].values()
            )
            lines.append(
                f"| {c} | {pct(r['mean_der_val'])} | {pct(r['mean_ca_drop_val'])} | {pct(r['max_asr_val'])} |{cols} "
                f"{pct(r['mean_der_test'])} | {r['mean_macs_ratio']:.2f} | {lat} | "
                f"{', '.join(r['latency_measured_on']) or '-'} | {mark} |"
            )
        if sel.get("incomplete"):
            lines += ["", "Incomplete (not part of this choice until their cells run):"]
            lines += [f"- {c}: no cell on {', '.join(m)}" for c, m in sel["incomplete"].items()]
        if sel.get("not_run"):
            lines += ["", f"Not run yet: {', '.join(sel['not_run'])}."]
        if sel["chosen"] != sel["current_default"]:
            lines += [
                "",
                f"Note: ccpurify's DEFAULTS still name `{sel['current_default']}` for this kind of data; update defaults.py.",
            ]
    return "\n".join(lines)


def cells_table(cells: dict, baselines: dict, defenses: list[str]) -> str:
    """Every cell in full: test CA/ASR/RA/DER before -> after, params, MACs, batch-1 latency, wall time."""
    lines = [
        "## Every cell (test split; before -> after)",
        "",
        "| model | defense | CA % | ASR % | RA % | DER % | params | MACs | ms b1/t1 (ratio) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(baselines, key=lambda n: (baselines[n]["dataset"], ATTACK_ORDER.index(baselines[n]["attack"])))
    for n in order:
        for d in defenses:
            c = cells.get(f"{n}|{d}")
            if c is None:
                continue
            t, lat = c["test"], c.get("latency", {})
            ms = (
                f"{lat['latency_ms_before_bs1_t1']:.3f} -> {lat['latency_ms_after_bs1_t1']:.3f} (x{lat['latency_ratio_bs1_t1']:.2f})"
                if lat
                else "-"
            )
            lines.append(
                f"| {n} | {d} | {pct(t['ca_before'])} -> {pct(t['ca'])} | {pct(t['asr_before'])} -> {pct(t['asr'])} | "
                f"{pct(t['ra_before'])} -> {pct(t['ra'])} | {pct(t['der'])} | {c['params_before']:,} -> {c['params_after']:,} | "
                f"{c['macs_before'] / 1e6:.1f}M -> {c['macs_after'] / 1e6:.1f}M | {ms} | {c['wall_time_s']:.1f} |"
            )
    return "\n".join(lines)


def compactness_table(cells: dict, defenses: list[str]) -> str:
    lines = [
        "## Compactness and cost per defense (means over all zoo models; ratios purified / undefended, same run)",
        "",
        "| defense | data | params | MACs | latency b1/t1 | latency b32/t2 | INT8 latency b1/t1 | wall time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in defenses:
        rows = [c for k, c in cells.items() if k.endswith(f"|{d}")]
        lat = [c.get("latency", {}) for c in rows]

        def fmt(key: str, source: list[dict]) -> str:
            m = mean(s.get(key) for s in source)
            return "-" if m is None else f"{m:.3f}"

        lines.append(
            f"| {d} | {CELLS[d].data} | {fmt('params_ratio', rows)} | {fmt('macs_ratio', rows)} | "
            f"{fmt('latency_ratio_bs1_t1', lat)} | {fmt('latency_ratio_bs32_t2', lat)} | "
            f"{fmt('int8_latency_ratio_bs1_t1', lat)} | {fmt('wall_time_s', rows)} |"
        )
    return "\n".join(lines)


def summary(cells: dict, baselines: dict, defenses: list[str]) -> dict:
    """Headline numbers: per dataset and defense, mean test and validation DER over attacks, mean
    MACs and latency ratios, and the CA a defense costs a model that has no backdoor."""
    out = defaultdict(dict)
    for dataset in ("cifar10", "gtsrb"):
        names = [n for n, b in baselines.items() if b["dataset"] == dataset and b["attack"] != "clean"]
        clean_models = [n for n, b in baselines.items() if b["dataset"] == dataset and b["attack"] == "clean"]
        for d in defenses:
            rows = [cells[f"{n}|{d}"] for n in names if f"{n}|{d}" in cells]
            on_clean = [cells[f"{n}|{d}"]["test"] for n in clean_models if f"{n}|{d}" in cells]
            if rows:
                out[dataset][d] = {
                    "attacks": len(rows),
                    "mean_der_test": mean(r["test"]["der"] for r in rows),
                    "mean_der_val": mean(r["val"]["der"] for r in rows),
                    "mean_macs_ratio": mean(r["macs_ratio"] for r in rows),
                    "mean_latency_ratio_bs1_t1": mean(r.get("latency", {}).get("latency_ratio_bs1_t1") for r in rows),
                    "mean_ca_drop_test": mean(r["test"]["ca_before"] - r["test"]["ca"] for r in rows),
                    "max_asr_test": max(r["test"]["asr"] for r in rows),
                    "clean_model_ca_drop_test": mean(t["ca_before"] - t["ca"] for t in on_clean),
                }
    return {"defaults": {kind: key(d.name, d.macs) for kind, d in DEFAULTS.items()}, "per_dataset": out}


def plot(cells: dict, defenses: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>pP*Xh"
    for i, d in enumerate(defenses):
        rows = [c for k, c in cells.items() if k.endswith(f"|{d}") and c["test"]["asr"] is not None]
        if rows:
            ax.scatter(
                [r["macs_ratio"] for r in rows],
                [100 * r["test"]["asr"] for r in rows],
                label=d,
                marker=markers[i % len(markers)],
                alpha=0.8,
            )
    ax.set_xlabel("MACs after / before")
    ax.set_ylabel("ASR after defense (%)")
    ax.set_title("Attack success rate against compute, every zoo model x defense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "asr_vs_macs.png", dpi=120)
    plt.close(fig)


def default_curves(cells: dict, baselines: dict) -> list[dict]:
    """Per dataset and kind of data, the default pipeline at each MACs target the grid ran, as means
    over that dataset's backdoored models (test split): the points of the README's CA-against-MACs
    figure, and the undefended models at MACs 1.0."""
    points = []
    for dataset in ("cifar10", "gtsrb"):
        # the PreAct-ResNet18 models (entries named dataset-attack), where every default ran
        names = [
            n
            for n, b in baselines.items()
            if b["dataset"] == dataset and b["attack"] != "clean" and n == f"{dataset}-{b['attack']}"
        ]
        if not names:
            continue
        points.append(
            {
                "dataset": dataset,
                "kind": "undefended",
                "macs": 1.0,
                "chosen": True,
                "ca": mean(baselines[n]["test"]["ca_before"] for n in names),
                "asr": mean(baselines[n]["test"]["asr_before"] for n in names),
            }
        )
        for kind, default in DEFAULTS.items():
            for target in (0.75, 0.5):
                rows = [
                    cells[f"{n}|pipeline:{key(default.name, target)}"]
                    for n in names
                    if f"{n}|pipeline:{key(default.name, target)}" in cells
                ]
                if len(rows) == len(names):
                    points.append(
                        {
                            "dataset": dataset,
                            "kind": kind,
                            "macs": mean(r["macs_ratio"] for r in rows),
                            "ca": mean(r["test"]["ca"] for r in rows),
                            "asr": mean(r["test"]["asr"] for r in rows),
                            "chosen": target == default.macs,
                            "pipeline": key(default.name, target),
                        }
                    )
    return points


def plot_defaults(cells: dict, baselines: dict) -> None:
    """results/defaults_ca_vs_macs.png: clean accuracy against MACs for each default (colour: the
    data it needs; marker: the dataset), its chosen target filled, mean ASR written at each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = default_curves(cells, baselines)
    colours = {"undefended": "black", "none": "tab:red", "clean": "tab:blue", "unlabeled": "tab:green"}
    labels = {
        "undefended": "undefended (backdoored)",
        "none": "no data",
        "clean": "labelled",
        "unlabeled": "unlabelled",
    }
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for dataset, marker in (("cifar10", "o"), ("gtsrb", "s")):
        for kind, colour in colours.items():
            curve = sorted(
                (p for p in points if p["dataset"] == dataset and p["kind"] == kind), key=lambda p: p["macs"]
            )
            if not curve:
                continue
            ax.plot([p["macs"] for p in curve], [100 * p["ca"] for p in curve], color=colour, alpha=0.5, lw=1)
            for p in curve:
                ax.scatter(
                    p["macs"],
                    100 * p["ca"],
                    color=colour if p["chosen"] else "white",
                    edgecolors=colour,
                    marker=marker,
                    s=60,
                    zorder=3,
                    label=f"{dataset}: {labels[kind]}" if p["chosen"] else None,
                )
                ax.annotate(
                    f"ASR {100 * p['asr']:.0f}%",
                    (p["macs"], 100 * p["ca"]),
                    textcoords="offset points",
                    xytext=(5, -10),
                    fontsize=7,
                    color=colour,
                )
    ax.set_xlabel("MACs, purified / undefended")
    ax.set_ylabel("clean accuracy % (mean, backdoored PreAct models)")
    ax.set_title("Default pipelines: accuracy kept against compute; mean ASR at each point", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "defaults_ca_vs_macs.png", dpi=120)
    plt.close(fig)
    write_json(RESULTS / "defaults_ca_vs_macs.json", {"points": points})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=str(ZOO), help="zoo folder (default: benchmarks/zoo)")
    parser.add_argument(
        "--entries", nargs="+", action="extend", default=None, help="zoo entries (default: all; repeatable)"
    )
    parser.add_argument(
        "--defenses",
        nargs="+",
        action="extend",
        default=None,
        help=f"defenses (default: the plan, see above): {', '.join(CELLS)}",
    )
    parser.add_argument(
        "--cell", nargs="+", action="extend", default=None, help="ENTRY:DEFENSE cells to run (repeatable)"
    )
    parser.add_argument("--redo", action="store_true", help="run cells again even if grid.json has them")
    parser.add_argument("--no-latency", action="store_true", help="skip ONNX export and latency")
    parser.add_argument("--tables-only", action="store_true", help="only rebuild the tables and plot")
    parser.add_argument("--data", default=None, help="dataset location (default: $CCPURIFY_DATA, then ../shared/data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        write_tables(read_json(RESULTS / "grid.json", EMPTY_GRID))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
