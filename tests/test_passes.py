"""Generic passes (Prune, Factorize), pipelines, reports, and purify(): on every zoo arch and the
custom architectures, the outputs are smaller, exact where they must be, saved and reloaded exactly."""

import dataclasses
import json
import typing

import numpy as np
import pytest
import torch
import torch_pruning as tp
from archs import CUSTOM, randomize_norms
from torch import nn

import ccpurify
from ccpurify import models, passes
from ccpurify.errors import InvalidInputError, NonFiniteError
from ccpurify.io import ArchRef, edits_of, load_model, save_model
from ccpurify.passes import OTBR, PASSES, Factorize, Pipeline, Prune, PurifyContext, Recover, list_passes

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
ALL = models.list_models() + sorted(CUSTOM)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = models.create(name, width=0.25) if name in models.list_models() else CUSTOM[name]()
    return randomize_norms(model)


def analytic_macs(model: nn.Module) -> int:
    """Conv and linear MACs from the shapes seen in a forward pass (independent of any counter).

    Per output element: ``C_in/groups * kh * kw`` (conv) or ``in_features`` (linear), plus one for
    a bias, which is torch-pruning's counting convention."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        per_output = (
            m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            if isinstance(m, nn.Conv2d)
            else m.in_features
        )
        total += out[0].numel() * (per_output + (m.bias is not None))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(X[:1])
    for h in hooks:
        h.remove()
    return total


def counted_conv_linear_macs(model: nn.Module) -> int:
    _, _, per_layer, _ = tp.utils.count_ops_and_params(model, X[:1], layer_wise=True)
    return int(sum(v for m, v in per_layer.items() if isinstance(m, (nn.Conv2d, nn.Linear))))


@pytest.mark.parametrize("name", ALL)
def test_factorize_at_full_rank_reproduces_the_logits(name):
    model = build(name)
    full, report = Factorize(rank=10**6, only_if_cheaper=False)(model)
    assert report.details.factorized, name
    with torch.no_grad():
        assert (full(X) - model(X)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ALL)
def test_prune_and_factorize_hit_their_targets_with_analytic_macs(name, tmp_path):
    model = build(name)
    pruned, pr = Prune(macs=0.5)(model)
    assert pr.macs_ratio <= 0.5 + 1e-6 and pr.macs_ratio > 0.4 and pr.params_after < pr.params_before
    factored, fr = Factorize(macs=0.5)(model)
    assert fr.macs_ratio <= 0.52
    for m in (pruned, factored):
        assert analytic_macs(m) == counted_conv_linear_macs(m)
    layer = fr.details.factorized[0]
    sub = factored.get_submodule(layer["layer"])
    assert layer["macs_after"] == sum(analytic_macs_of_layer(factored, s) for s in sub)
    # save -> load rebuilds the changed structure and gives identical logits
    arch = ArchRef(import_path=f"archs:{type(model).__name__}") if name in CUSTOM else None
    for i, m in enumerate((pruned, factored)):
        path = save_model(m, tmp_path / f"{i}.safetensors", arch=arch)
        with torch.no_grad():
            assert torch.equal(load_model(path, allow_import=True)(X), m(X))


def analytic_macs_of_layer(model: nn.Module, layer: nn.Module) -> int:
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    h = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(X[:1])
    h.remove()
    return total


def test_a_pipeline_chains_edits_and_reloads_exactly(tmp_path):
    model = build("preact_resnet18")
    out, report = Pipeline([Prune(macs=0.7), Factorize(macs=0.6), Prune(params=0.8)])(model)
    assert [e["op"] for e in edits_of(out)] == ["remove_channels", "factorize", "remove_channels"]
    assert report.macs_after < 0.7 * 0.6 * report.macs_before * 1.05
    json.dumps(report.to_dict())
    loaded = load_model(save_model(out, tmp_path / "chain.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(X), out(X))


def test_a_prune_target_of_the_pipeline_input_counts_what_earlier_passes_removed():
    """Prune(macs=0.5, search_steps=5) after Prune(macs=0.7, search_steps=5) keeps 0.5 of its own input (about 0.35 of the dense
    model); with of_pipeline_input it keeps 0.5 of the dense model, and where the input is already
    below the target it removes nothing."""
    model = models.create("preact_resnet18", num_classes=10, width=0.25)
    _, own = Pipeline([Prune(macs=0.7, search_steps=5), Prune(macs=0.5, search_steps=5)])(model)
    _, dense = Pipeline([Prune(macs=0.7, search_steps=5), Prune(macs=0.5, search_steps=5, of_pipeline_input=True)])(
        model
    )
    assert own.macs_after < 0.5 * 0.7 * own.macs_before * 1.05
    assert 0.4 * dense.macs_before < dense.macs_after <= 0.5 * dense.macs_before
    _, idle = Pipeline([Prune(macs=0.5, search_steps=5), Prune(macs=0.7, search_steps=5, of_pipeline_input=True)])(
        model
    )
    assert idle.passes[1].details.groups_pruned == 0 and idle.passes[1].macs_after == idle.passes[1].macs_before


def test_passes_never_modify_their_input():
    model = build("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Prune(macs=0.5)(model)
    Factorize(macs=0.5)(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_is_deterministic():
    model = build("mobilenet_v2")
    a, _ = Prune(macs=0.6)(model)
    b, _ = Prune(macs=0.6)(model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prune_round_to_keeps_every_pruned_width_a_multiple():
    model = build("preact_resnet18")
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    out, report = Prune(macs=0.5, round_to=8)(model)
    widths = {n: m.out_channels for n, m in out.named_modules() if isinstance(m, torch.nn.Conv2d)}
    changed = [n for n in widths if widths[n] != dense[n]]
    assert changed and all(widths[n] % 8 == 0 for n in changed)
    assert report.macs_ratio <= 0.5
    with pytest.raises(ValueError, match="round_to"):
        Prune(round_to=0)


def test_factorize_round_to_gives_rank_multiples_within_the_budget():
    model = build("preact_resnet18")
    out, report = Factorize(macs=0.5, round_to=8)(model)
    ranks = [r for layer in report.details.factorized for r in layer["ranks"]]
    assert ranks and all(r % 8 == 0 for r in ranks) and report.macs_ratio <= 0.5


def test_taylor_importance_needs_data_and_uses_it():
    model = build("vgg16_bn")
    with pytest.raises(ValueError, match="Taylor importance needs images"):
        Prune(macs=0.6, importance="taylor")(model)
    data = passes.LabeledData(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    out, report = Prune(macs=0.6, importance="taylor")(model, PurifyContext(clean_data=data))
    assert report.macs_ratio <= 0.6


def test_bad_targets_are_rejected():
    with pytest.raises(ValueError, match="one target"):
        Prune(macs=0.5, params=0.5)
    with pytest.raises(ValueError, match="fraction"):
        Factorize(macs=1.5)


def test_purify_leaves_the_callers_model_in_train_mode():
    model = build("vgg16_bn").train()
    ccpurify.purify(model, "prune", macs=0.8)
    assert model.training


def test_purify_runs_every_pass_of_a_pipeline_inside_a_list():
    result = ccpurify.purify(build("vgg16_bn"), [Pipeline([passes.CLP(), Prune(macs=0.8)]), "factorize"])
    assert [p.name for p in result.report.passes] == ["clp", "prune", "factorize"]


def test_registry_and_purify_entry_point():
    assert {"prune", "factorize"} <= set(passes.list_passes())
    result = ccpurify.purify(build("vgg16_bn"), "factorize", macs=0.5)
    assert result.report.passes[0].name == "factorize" and result.report.to_dict()["macs_ratio"] <= 0.52
    with pytest.raises(KeyError, match="unknown pass"):
        ccpurify.purify(build("vgg16_bn"), "magic")
    with pytest.raises(ValueError, match="labels range"):
        ccpurify.purify(build("vgg16_bn"), "prune", clean_data=(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 99])))
    with pytest.raises(ValueError, match="model takes"):
        ccpurify.purify(
            build("vgg16_bn"),
            "prune",
            unlabeled_data=torch.randn(4, 3, 16, 16),
            example_inputs=torch.zeros(1, 3, 32, 32),
        )
    with pytest.raises(ValueError, match=r"fails on an example input of shape \(1, 3, 16, 16\).*--input-shape"):
        ccpurify.purify(
            build("vgg16_bn"), "prune", unlabeled_data=torch.randn(4, 3, 16, 16)
        )  # the images' size, when none is given


def test_every_pass_reports_typed_details_that_serialise_to_json(ci_run, data_dir):
    """Each pass's report carries its own ``PassDetails`` dataclass: named fields in Python, plain
    JSON in the report, and the training log the budget line reads."""
    from ccpurify import defender
    from ccpurify.passes import BCU, CLP, OTBR, RNP, CleanCompact, LabeledData, PassDetails, Recover, UnlabeledData

    clean = defender.clean_data(ci_run.run_dir, "cifar10", data_dir=data_dir)
    context = PurifyContext(
        num_classes=10,
        clean_data=LabeledData(clean.x[:64], clean.y[:64]),
        unlabeled_data=UnlabeledData(clean.x[:64]),
    )
    runs = {
        "clp": CLP(),
        "otbr": OTBR(steps=2, batch_size=8),
        "rnp": RNP(unlearn_epochs=1, recover_epochs=1, prune_fraction=0.05),
        "prune": Prune(macs=0.8),
        "factorize": Factorize(macs=0.8),
        "cc": CleanCompact(macs=0.8),
        "bcu": BCU(epochs=1),
    }
    trained = {}
    for name, p in runs.items():
        _, report = p(ci_run.model, context)
        assert type(report.details) is not PassDetails and isinstance(report.details, PassDetails), name
        json.dumps(report.to_dict())
        trained[name] = report.details.training()
    assert trained["rnp"].kind == "labelled" and trained["rnp"].images == 64
    assert trained["bcu"].kind == "unlabelled" and trained["bcu"].sample_steps == 64
    assert all(trained[n] is None for n in ("clp", "otbr", "prune", "factorize", "cc"))
    _, recovered = Pipeline([CLP(), Recover(data="clean", epochs=1)])(ci_run.model, context)
    assert recovered.passes[1].details.training().images == 64 and "64 labelled images" in recovered.budget()


def test_a_custom_pass_must_report_typed_details():
    from ccpurify.passes import Pass, PassDetails, PassResult

    class Untyped(Pass):
        name = "untyped"

        def run(self, model, context):
            return PassResult(model, {"reached": False})

    class Typed(Pass):
        name = "typed"

        def run(self, model, context):
            return PassResult(model, PassDetails())

    model = build("preact_resnet18")
    with pytest.raises(TypeError, match="PassDetails"):
        Untyped()(model)
    assert Typed()(model)[1].to_dict()["details"] == {}


def test_cc_says_when_its_macs_target_is_out_of_reach():
    from ccpurify.passes import CleanCompact

    model = build("preact_resnet18")
    assert CleanCompact(macs=0.01)(model)[1].details.target_reached() is False
    assert CleanCompact(macs=0.9)(model)[1].details.target_reached() is True


def test_nested_options_are_checked_when_the_pass_is_built():
    """A pass where a pass is needed, and C&C's recovery options, are refused before any work."""
    from ccpurify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="compact of pass 'bcu' takes Pass"):
        passes.create("bcu", compact="prune")
    with pytest.raises(InvalidInputError, match="no option bogus"):
        passes.create("cc", recover=True, recover_options={"bogus": 1})
    with pytest.raises(InvalidInputError, match="epochs"):
        passes.create("cc", recover=True, recover_options={"epochs": 0})
    assert passes.create("bcu", compact=Prune(macs=0.5)).compact.macs == 0.5


def test_options_without_a_method_are_refused_naming_them_and_how_to_name_a_method():
    from ccpurify.api import resolve
    from ccpurify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"options \(epochs\) configure a named method .*--method NAME"):
        resolve(None, {"epochs": 3}, has_clean=False, has_unlabeled=False)


def test_an_unknown_option_is_named_before_the_model_is_run():
    """Given a model whose output is not logits and a misspelt option, the error names the option:
    the cheap mistake the user can fix is reported first, without running the model."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten()

    with pytest.raises(InvalidInputError, match="epochz"):
        ccpurify.purify(Flat(), "clp", epochz=3, example_inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidInputError, match=r"logits of shape"):
        ccpurify.purify(Flat(), "clp", example_inputs=torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("name", list_passes())
def test_every_pass_built_directly_refuses_an_option_of_the_wrong_type_in_one_line(name: str) -> None:
    cls = PASSES.get(name)
    hints = typing.get_type_hints(cls)
    numeric = next(
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}
        and str not in typing.get_args(hints[f.name])
    )
    with pytest.raises(InvalidInputError, match=f"option {numeric} of pass '{name}' takes"):
        cls(**{numeric: "abc"})
    with pytest.raises(NonFiniteError, match=f"option {numeric}=nan of pass '{name}' is not a finite number"):
        cls(**{numeric: float("nan")})


def test_a_container_where_a_choice_or_a_name_goes_is_refused_in_one_line() -> None:
    with pytest.raises(InvalidInputError, match="option residual_policy of pass 'otbr' takes one of"):
        OTBR(residual_policy=[1])
    with pytest.raises(InvalidInputError, match="pass 'recover' has no option 1"):
        passes.CleanCompact(recover_options={1: 2})


def test_numpy_numbers_are_accepted_and_list_items_are_checked() -> None:
    otbr = OTBR(ratio=np.float32(0.05), steps=np.int64(3))
    assert otbr.ratio == pytest.approx(0.05) and type(otbr.ratio) is float and type(otbr.steps) is int  # JSON-able
    assert OTBR(ratio_search=[np.float64(0.01), 0.1]).ratio_search == (0.01, 0.1)
    with pytest.raises(
        InvalidInputError, match=r"option ratio_search of pass 'otbr' takes a list of float in \(0, 1\) or null"
    ):
        OTBR(ratio_search=(0.1, "0.2"))
    for bad in (0.0, 1.0, float("nan")):  # each entry lies in its item type's range
        with pytest.raises(
            InvalidInputError, match=r"each entry of option ratio_search of pass 'otbr' must be in \(0, 1\)"
        ):
            OTBR(ratio_search=(0.1, bad))


@pytest.mark.parametrize(
    "cls, option, value, says",
    [
        (Recover, "lr", -1.0, "must be > 0"),
        (Recover, "batch_size", 0, "must be >= 1"),
        (Recover, "temperature", 0.0, r"must be in \[0.1, 1000\]"),
        (OTBR, "ratio", 1.0, r"must be in \[0, 1\)"),
        (OTBR, "lam", 1.5, r"must be in \[0, 1\]"),
        (OTBR, "min_agreement", 0.0, r"must be in \(0, 1\]"),
        (OTBR, "max_layer_ratio", 0.0, r"must be in \(0, 1\]"),
        (Recover, "temperature", 1e-30, r"must be in \[0.1, 1000\]"),
        (Recover, "epochs", 10**30, r"must be at most 1e\+09"),
        (passes.RNP, "validation_fraction", 2.5, r"must be in \(0, 1\)"),
        (passes.BCU, "first_ratio", -1.0, r"must be in \[0, 1\]"),
        (Prune, "search_steps", -1, "must be >= 1"),
        (OTBR, "momentum", -1.0, r"must be in \[0, 1\)"),
        (OTBR, "eps", -1.0, "must be > 0"),
        (OTBR, "steps", 10**400, r"must be at most 1e\+09"),
        (passes.CleanCompact, "tau", -1.0, "must be > 0"),
        (Factorize, "round_to", 0, "must be >= 1"),
        (Prune, "max_layer_ratio", 5.0, r"must be in \(0, 1\]"),
        (OTBR, "momentum", 1.0, r"must be in \[0, 1\)"),
        (Prune, "compensate", 10**400, "takes bool, got an integer of 401 digits"),
    ],
)
def test_an_option_outside_its_range_is_refused_in_one_line(cls: type, option: str, value: object, says: str) -> None:
    """Given a value of the right type but outside the option's range, the pass is not built, and the
    error names the option and the range it takes."""
    with pytest.raises(InvalidInputError, match=f"option {option}.* of pass '{cls.name}' {says}"):
        cls(**{option: value})


def test_a_context_takes_the_normalisation_as_mean_and_std_and_refuses_anything_else():
    """Passes call ``context.normalize`` on pixel images: a ``(mean, std)`` pair given to the
    context directly (as ``purify`` takes it) is converted, not kept as a tuple that fails mid-run."""
    from ccpurify.transforms import Normalize

    context = passes.PurifyContext(normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert context.normalize == Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for bad in ("x", ((0.5,), (0.0,)), 3):
        with pytest.raises(InvalidInputError, match="normalize"):
            passes.PurifyContext(normalize=bad)
