"""One benchmark-grid cell end to end on a ci-preset model: train (the session's ci run), purify,
score on test and validation images, export to ONNX, INT8, and time against the undefended model."""

import pytest
import torch


@pytest.mark.parametrize("defense", ["clp", "pipeline:clp+prune+recover@0.5"])
def test_one_grid_cell_end_to_end(ci_run, data_dir, defense, tmp_path, monkeypatch):
    from benchmarks import common
    from benchmarks.grid import CELLS, run_cell

    monkeypatch.setattr(common, "CACHE", tmp_path)
    entry = common.load_entry(ci_run.run_dir.name, ci_run.run_dir.parent, str(data_dir))
    if defense.startswith("pipeline"):  # the same recipe, at a size that keeps CI fast
        from ccpurify.passes import CLP, Pipeline, Prune, Recover

        monkeypatch.setitem(
            CELLS,
            defense,
            CELLS[defense].__class__(
                "none",
                lambda: Pipeline(
                    [
                        CLP(u=2.25),
                        Prune(macs=0.5),
                        Recover(data="synthetic", synthetic_images=64, synthetic_steps=10, epochs=2),
                    ]
                ),
                "small",
            ),
        )
    result = run_cell(entry, defense, latency=True)
    for split in ("test", "val"):
        assert 0 <= result[split]["ca"] <= 1 and result[split]["der"] is not None
    assert result["test"]["ca_before"] == pytest.approx(ci_run.metrics["ca"])
    latency = result["latency"]
    assert latency["parity_max_abs_diff"] <= 1e-4 and latency["latency_ratio_bs1_t1"] > 0
    assert latency["int8_bytes"] < latency["onnx_bytes"]
    if defense.startswith("pipeline"):
        assert result["macs_ratio"] <= 0.5 and [p["name"] for p in result["passes"]] == ["clp", "prune", "recover"]


def test_the_plan_runs_candidates_only_where_the_defaults_are_chosen():
    from benchmarks.grid import CELLS, SELECTION_ENTRIES, planned_cells
    from ccpurify.passes.defaults import CANDIDATES, DEFAULTS, MACS_TARGETS

    plan = planned_cells([SELECTION_ENTRIES[0], "gtsrb-lf"])
    on_gtsrb = {d for e, d in plan if e == "gtsrb-lf"}
    on_selection = {d for e, d in plan if e == SELECTION_ENTRIES[0]}
    every_candidate_at_every_target = {f"pipeline:{c}@{m:g}" for c in CANDIDATES for m in MACS_TARGETS}
    assert on_selection == set(CELLS) and every_candidate_at_every_target <= on_selection
    assert {f"pipeline:{d.name}@{d.macs:g}" for d in DEFAULTS.values()} <= on_gtsrb
    assert {"clp", "cc", "otbr", "rnp", "bcu", "bcu-ood", "bcu-compact"} <= on_gtsrb
    assert len({d for d in on_gtsrb if d.startswith("pipeline:")}) == len(set(DEFAULTS.values()))


def test_a_stored_cell_is_rerun_only_when_its_recipe_changed():
    from benchmarks.grid import CELLS, as_pipeline, is_stale, recipe

    def stored(defense, drop=None, **changes):
        steps = recipe(as_pipeline(CELLS[defense].build()))
        for step in steps:
            config = {k: v for k, v in step["config"].items() if k != drop}
            step["config"] = {**config, **changes} if step["name"] == "recover" else config
        return {"recipe": steps}

    plain, hints = "pipeline:otbr+prune+recover@0.5", "pipeline:otbr+prune+recover-hints@0.5"
    assert not is_stale(stored(plain), plain) and is_stale(None, plain)
    assert not is_stale(
        stored(plain, drop="feature_weight"), plain
    )  # stored before the option existed; default = old behaviour
    assert is_stale(stored(hints, drop="feature_weight"), hints)  # the option is on now: rerun
    assert is_stale(stored(plain, epochs=3), plain)


def test_a_nested_pass_option_added_since_a_cell_ran_keeps_it_fresh_at_its_default():
    from benchmarks.grid import CELLS, as_pipeline, is_stale, recipe

    bcu = "pipeline:bcu-compact@0.5"
    steps = recipe(as_pipeline(CELLS[bcu].build()))
    compact = steps[0]["config"]["compact"]
    stored_before_compensate = {k: v for k, v in compact.items() if k != "compensate"}
    assert not is_stale(
        {"recipe": [{"name": "bcu", "config": {**steps[0]["config"], "compact": stored_before_compensate}}]}, bcu
    )
    assert is_stale(
        {"recipe": [{"name": "bcu", "config": {**steps[0]["config"], "compact": {**compact, "macs": 0.75}}}]}, bcu
    )


def test_a_fallback_cell_is_fresh_until_a_nested_pass_changes():
    """Fallback has required options (its two passes): its nested passes are compared by name."""
    from benchmarks.grid import CELLS, as_pipeline, is_stale, recipe
    from ccpurify.passes.defaults import DEFAULTS, key

    default = f"pipeline:{key(DEFAULTS['none'].name, DEFAULTS['none'].macs)}"
    steps = recipe(as_pipeline(CELLS[default].build()))
    assert steps[0]["name"] == "fallback" and not is_stale({"recipe": steps}, default)
    first = steps[0]["config"]["first"]
    changed = [{**steps[0], "config": {**steps[0]["config"], "first": {**first, "max_area": 0.5}}}, *steps[1:]]
    assert is_stale({"recipe": changed}, default)


def test_the_headline_averages_over_backdoored_models_and_reports_the_clean_models_ca_cost_apart():
    from benchmarks.grid import summary

    def cell(ca_before, ca, asr_before, asr, der):
        test = {"ca_before": ca_before, "ca": ca, "asr_before": asr_before, "asr": asr, "der": der}
        return {"test": test, "val": test, "macs_ratio": 0.5, "latency": {"latency_ratio_bs1_t1": 0.8}}

    baselines = {
        "c-badnets": {"dataset": "cifar10", "attack": "badnets"},
        "c-blended": {"dataset": "cifar10", "attack": "blended"},
        "c-clean": {"dataset": "cifar10", "attack": "clean"},
    }
    cells = {
        "c-badnets|otbr": cell(0.85, 0.80, 0.95, 0.05, 0.9),
        "c-blended|otbr": cell(0.85, 0.84, 0.99, 0.99, 0.5),
        "c-clean|otbr": cell(0.86, 0.83, None, None, None),
    }
    row = summary(cells, baselines, ["otbr"])["per_dataset"]["cifar10"]["otbr"]
    assert (
        row["attacks"] == 2
        and row["mean_der_test"] == pytest.approx(0.7)
        and row["max_asr_test"] == pytest.approx(0.99)
    )
    assert row["mean_ca_drop_test"] == pytest.approx(0.03) and row["clean_model_ca_drop_test"] == pytest.approx(0.03)


def test_cells_entries_and_defenses_accumulate_over_repeated_flags():
    from benchmarks.grid import build_parser

    args = build_parser().parse_args(
        ["--cell", "a:clp", "b:otbr", "--cell", "c:pipeline:bcu-compact", "--entries", "x", "--entries", "y"]
    )
    assert (
        args.cell == ["a:clp", "b:otbr", "c:pipeline:bcu-compact"]
        and args.entries == ["x", "y"]
        and args.defenses is None
    )


def test_the_baseline_cache_key_follows_the_weights_not_the_object():
    import copy

    import torch

    from benchmarks.common import model_fingerprint
    from ccpurify import models

    a = models.create("preact_resnet18", width=0.125)
    b = copy.deepcopy(a)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.linear.bias.add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_a_sweep_point_is_a_grid_cell_with_the_named_pass_s_data(ci_run, data_dir, monkeypatch, tmp_path):
    """``sweep:PASS:KEY=VALUE`` names a cell that builds the pass by name with those options, on the
    defender data of the cell named PASS; it runs and is scored by the grid's harness, and a stored
    point is stale once its options differ."""
    from benchmarks import common
    from benchmarks.grid import cell_for, is_stale, parse_sweep_cell, run_cell, sweep_cell

    name = sweep_cell("rnp", {"prune_fraction": 0.1, "mode": "faithful"})
    assert name == 'sweep:rnp:mode="faithful";prune_fraction=0.1'
    assert parse_sweep_cell(name) == ("rnp", {"mode": "faithful", "prune_fraction": 0.1})
    with pytest.raises(ValueError, match="cannot contain ';'"):  # it would parse back as two options
        sweep_cell("recover", {"synthetic_init": "a;b=1"})
    cell = cell_for(name)
    rnp = cell.build()
    assert cell.data == "clean" and rnp.prune_fraction == 0.1 and rnp.mode.value == "faithful"
    with pytest.raises(ValueError, match="no_such_option"):
        cell_for("sweep:clp:no_such_option=1")
    with pytest.raises(KeyError):
        cell_for("sweep:no-such-pass:u=1")

    monkeypatch.setattr(common, "CACHE", tmp_path)
    entry = common.load_entry(ci_run.run_dir.name, ci_run.run_dir.parent, str(data_dir))
    point = sweep_cell("clp", {"u": 2.5})
    result = run_cell(entry, point, latency=False)
    assert result["recipe"][0]["config"]["u"] == 2.5 and result["val"]["der"] is not None
    assert 0 <= result["noise_entropy"] <= 2.31  # at most log(10) nats
    assert not is_stale(result, point) and is_stale(result, sweep_cell("clp", {"u": 3.0}))


def test_the_default_is_chosen_on_both_datasets_and_a_der_tie_goes_to_the_smaller_ca_drop():
    from benchmarks.grid import select_defaults

    def cell(der, ca=0.8, macs=0.5, latency=0.7, asr=0.05):
        scores = {"ca_before": 0.9, "ca": ca, "asr_before": 0.9, "asr": asr, "der": der}
        return {"test": scores, "val": scores, "macs_ratio": macs, "latency": {"latency_ratio_bs1_t1": latency}}

    baselines = {f"{d}-{a}": {"dataset": d, "attack": a} for d in ("cifar10", "gtsrb") for a in ("badnets", "wanet")}
    plain, budget, other, late = (
        "rnp-ranked+prune+recover@0.5",
        "rnp-ranked+prune+recover-budget@0.5",
        "rnp+prune+recover@0.5",
        "clp+otbr+prune+recover-clean@0.5",
    )
    cells = {}
    for n in baselines:
        cells[f"{n}|pipeline:{plain}"] = cell(0.885, ca=0.7)
        cells[f"{n}|pipeline:{budget}"] = cell(0.88, ca=0.8)  # within a point, and 10 points less CA lost
        cells[f"{n}|pipeline:{other}"] = cell(0.95, latency=0.9)  # better, but not faster enough
    cells["cifar10-badnets|pipeline:" + late] = cell(0.99)  # run on one selection model only
    chosen = select_defaults(cells, baselines)["clean"]
    assert chosen["entries"] == ["cifar10-badnets", "cifar10-wanet", "gtsrb-badnets", "gtsrb-wanet"]
    assert chosen["chosen"] == budget and not chosen["candidates"][other]["eligible"]
    assert chosen["incomplete"] == {late: ["cifar10-wanet", "gtsrb-badnets", "gtsrb-wanet"]}
    assert late not in chosen["candidates"] and plain in chosen["candidates"]
    assert chosen["candidates"][budget]["per_dataset"]["gtsrb"]["mean_ca_drop_val"] == pytest.approx(0.1)
    assert chosen["candidates"][budget]["latency_measured_on"] == ["unknown (vector extension not recorded)"]
    cells["gtsrb-wanet|pipeline:" + budget]["latency"].update(machine="AMD EPYC", simd="avx512f")
    measured = select_defaults(cells, baselines)["clean"]["candidates"][budget]["latency_measured_on"]
    assert measured == ["AMD EPYC (avx512f)", "unknown (vector extension not recorded)"]  # two machines: both shown

    cells["cifar10-wanet|pipeline:" + budget]["val"]["asr"] = 0.15  # one backdoor survives the tie's CA-drop winner
    assert select_defaults(cells, baselines)["clean"]["chosen"] == plain
    cells["cifar10-wanet|pipeline:" + plain]["val"]["asr"] = 0.12  # ... and the other's too: CA drop decides again
    assert select_defaults(cells, baselines)["clean"]["chosen"] == budget
    cells["cifar10-wanet|pipeline:" + plain]["val"]["asr"] = cells["cifar10-wanet|pipeline:" + budget]["val"]["asr"] = (
        0.05
    )

    cells["gtsrb-wanet|pipeline:" + plain] = cell(0.95, ca=0.7)  # a real difference, on GTSRB
    assert select_defaults(cells, baselines)["clean"]["chosen"] == plain
    for n in baselines:  # ... unless it keeps too many MACs
        cells[f"{n}|pipeline:{plain}"]["macs_ratio"] = 0.9
    assert select_defaults(cells, baselines)["clean"]["chosen"] == budget


def test_ca_drops_closer_than_the_tie_count_as_equal_and_the_name_decides():
    """Two candidates tied on DER whose mean validation CA drops differ by a tenth of ``CA_TIE`` (the
    same computation on two CPUs) are equal on CA drop, and the name decides; a difference of twice
    ``CA_TIE`` still goes to the smaller drop. A candidate that leaves a backdoor above ``ASR_GOAL``
    neither wins nor sets the drop the others are measured from."""
    from benchmarks.grid import CA_TIE, select_defaults

    def cell(ca: float, asr: float = 0.02) -> dict:
        scores = {"ca_before": 0.9, "ca": ca, "asr_before": 0.9, "asr": asr, "der": 0.9}
        return {"test": scores, "val": scores, "macs_ratio": 0.7, "latency": {"latency_ratio_bs1_t1": 0.7}}

    baselines = {f"{d}-{a}": {"dataset": d, "attack": a} for d in ("cifar10", "gtsrb") for a in ("badnets", "wanet")}
    first, second = "otbr+prune+recover@0.75", "clp+prune+recover@0.75"  # "clp..." sorts first
    for gap, chosen in ((CA_TIE / 10, second), (2 * CA_TIE, first)):
        cells = {}
        for n in baselines:
            cells[f"{n}|pipeline:{first}"] = cell(0.85)
            cells[f"{n}|pipeline:{second}"] = cell(0.85 - gap)  # loses a little more CA
        assert select_defaults(cells, baselines)["none"]["chosen"] == chosen, gap
    backdoored = "clp+otbr+prune+recover@0.75"  # sorts before both, loses the least CA, keeps a backdoor
    for n in baselines:
        cells[f"{n}|pipeline:{backdoored}"] = cell(0.85 + 1.5 * CA_TIE, asr=0.15 if n == "gtsrb-wanet" else 0.02)
    assert select_defaults(cells, baselines)["none"]["chosen"] == first


def test_bad_cells_are_refused_in_one_line_before_any_model_is_loaded(monkeypatch):
    from benchmarks import grid

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the cells were checked")

    monkeypatch.setattr(grid, "load_entry", no_work)
    for cell, message in (
        ("cifar10-badnets:sweep:clp:no_such_option=1", "no_such_option"),
        ("cifar10-badnets:no-such-defense", "unknown defense"),
        ("no-such-entry:clp", "no zoo entry"),
        ("cifar10-badnets", "ENTRY:DEFENSE"),
    ):
        with pytest.raises(SystemExit, match=message):
            grid.main(["--cell", cell, "--no-latency"])


def test_data_amount_takes_unlabelled_images_from_the_pool_and_refuses_to_redraw_a_subset_run(ci_run, data_dir):
    from benchmarks import common
    from benchmarks.data_amount import unlabelled
    from ccpurify import defender

    entry = common.load_entry(ci_run.run_dir.name, ci_run.run_dir.parent, str(data_dir))
    pool = entry.unlabeled_data(len(entry.run.defender.unlabeled_pool))
    drawn = unlabelled(entry, 100)  # drawn across the class-ordered pool, not its first 100 images
    assert torch.equal(drawn.x, pool.x[torch.from_numpy(defender.draw(len(pool), 100))])
    assert not torch.equal(drawn.x, pool.x[:100])
    # The ci preset trains on a 5,000-image subset: a continued draw would not be the one the pool
    # came from, so it is refused rather than silently mixing draws.
    with pytest.raises(SystemExit, match="cannot be redrawn"):
        unlabelled(entry, len(pool) + 1)


def test_the_budget_curve_reads_each_models_recovery_budgets():
    """Given datafree_default rows with the default's recovery at several budgets, the curve lists
    each model's budgets in order with CA, ASR and seconds, skips rows with fewer than three budgets
    or without the ratio search, and the table marks the default's budget."""
    from benchmarks.experiments.budget_curve import curves, table

    def point(ca, asr, seconds):
        return {"val_ca": ca, "val_asr": asr, "seconds": seconds}

    stored = {
        "cifar10-badnets@0.75-otbr-search": {
            "J-b40960": point(0.8, 0.01, 900.0),
            "A-hints30-guard-shared": point(0.75, 0.0, 250.0),
            "J-b2560": point(0.6, 0.02, 80.0),
            "otbr": point(0.74, 0.0, 0.0),
        },
        "cifar10-clean@0.75-otbr-search": {"J-b2560": point(0.6, None, 80.0), "J-b5120": point(0.7, None, 120.0)},
        "cifar10-wanet@0.75": {v: point(0.5, 0.0, 1.0) for v in ("J-b2560", "J-b5120", "J-b20480")},
    }
    found = curves(stored)
    assert list(found) == ["cifar10-badnets@0.75"]
    assert [p["budget"] for p in found["cifar10-badnets@0.75"]] == [2560, 10240, 40960]
    lines = table(found)
    assert "| 2,560 | 10,240 (default) | 40,960 |" in lines[4]
    assert lines[6] == "| cifar10-badnets@0.75 | 60.0 / 2.0, 80 s | 75.0 / 0.0, 250 s | 80.0 / 1.0, 900 s |"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--pipelines", "bcu-compact"], "at its MACs target"),
        (["--pipelines", "bcu-compact@0.5"], "not a candidate for clean data"),
        (["--pipelines", "rnp-ranked+prune+recover@1.5"], "in \\(0, 1\\)"),
        (["--counts", "0"], "counts must be >= 1"),
        (["--tables-only", "--entries", "nope"], "unknown zoo entries"),
    ],
)
def test_data_amount_refuses_bad_names_and_counts_before_loading_anything(argv, says, monkeypatch):
    import benchmarks.data_amount as data_amount

    monkeypatch.setattr(data_amount, "load_entry", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match=says):
        data_amount.main(argv)


def test_data_amount_tables_keep_every_stored_entry_whatever_a_run_was_given():
    """A run on one zoo entry rewrites the report from every stored cell: the other entries' rows
    stay, the default entries first."""
    from benchmarks.data_amount import stored_entries

    cells = {"gtsrb-badnets|dense": {}, "cifar10-wanet|x@0.75|500": {}, "cifar10-badnets|dense": {}}
    assert stored_entries(cells) == ["cifar10-badnets", "cifar10-wanet", "gtsrb-badnets"]
