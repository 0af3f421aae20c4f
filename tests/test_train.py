"""Poisoned training: the ci preset learns a BadNets backdoor; run directories are complete and
reproducible; training resumes; bad configurations fail early."""

import json

import numpy as np
import pytest
import torch

from ccpurify.train import RunExistsError, defender_resources, lr_at, open_run, preset_config, train


def test_ci_badnets_learns_the_backdoor_and_keeps_clean_accuracy(ci_run):
    assert ci_run.metrics["asr"] >= 0.80
    assert ci_run.metrics["ca"] >= 0.35  # chance is 0.10


def test_run_directory_holds_everything_the_protocol_asks_for(ci_run):
    run_dir = ci_run.run_dir
    for name in [
        "manifest.json",
        "model.safetensors",
        "attack.json",
        "attack.safetensors",
        "poison_indices.json",
        "defender.json",
        "metrics.json",
    ]:
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint.pt").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["preset"] == "ci" and manifest["seed"] == 0
    assert manifest["versions"]["torch"].startswith("2.") and manifest["data"]["train"]["verified"]
    assert manifest["wall_time_s"] > 0 and set(manifest["files"]) >= {"model.safetensors", "metrics.json"}


def test_defender_subsets_contain_no_poisoned_index(ci_run):
    run = open_run(ci_run.run_dir)
    poisoned = set(json.loads((ci_run.run_dir / "poison_indices.json").read_text()))
    assert len(poisoned) == round(0.1 * run.config.train_subset)
    d = run.defender
    assert not poisoned & set(d.clean_subset) and not poisoned & set(d.unlabeled_pool)
    assert set(d.rnp_subset) <= set(d.clean_subset) and not set(d.clean_subset) & set(d.unlabeled_pool)


def test_run_directory_reloads_model_and_trigger(ci_run, cifar_test):
    run = open_run(ci_run.run_dir)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run.load_model()(x), ci_run.model.eval()(x))
    np.testing.assert_array_equal(run.attack.apply(cifar_test.images[:4]), ci_run.attack.apply(cifar_test.images[:4]))


def test_finished_run_is_not_overwritten_by_accident(ci_run):
    with pytest.raises(RunExistsError, match="--overwrite"):
        train(open_run(ci_run.run_dir).config, ci_run.run_dir)


def tiny(**kw):
    return preset_config("ci", "cifar10", "badnets", train_subset=256, test_subset=200, epochs=2, batch_size=64, **kw)


def test_same_seed_gives_identical_weights(data_dir):
    a, b = train(tiny(), data_dir=data_dir), train(tiny(), data_dir=data_dir)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    from ccpurify import train as train_module

    uninterrupted = train(tiny(), data_dir=data_dir)
    save = train_module._save_checkpoint

    def save_then_interrupt(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path / "run", data_dir=data_dir)
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "manifest.json").exists()
    resumed = train(tiny(), tmp_path / "run", data_dir=data_dir)
    for x, y in zip(uninterrupted.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(x, y)
    first_epoch = resumed.metrics["history"][0]["seconds"]  # trained before the interruption, still counted
    assert first_epoch > 0 and resumed.metrics["train_wall_time_s"] > first_epoch


def test_a_diverging_run_stops_with_an_error_and_writes_no_run(tmp_path, data_dir):
    with pytest.raises(FloatingPointError, match="training diverged at epoch 1 .* lower --lr"):
        train(tiny(lr=1e30), tmp_path / "run", data_dir=data_dir)
    assert not (tmp_path / "run" / "manifest.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_onecycle_rises_then_falls_to_zero():
    config = preset_config("cpu", epochs=10, lr=0.1, warmup=0.2)
    lrs = [lr_at(config, e, s, 10) for e in range(10) for s in range(10)]
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 19 and lrs[-1] < 0.002


def test_paper_preset_is_backdoorbench_recipe():
    config = preset_config("paper", "gtsrb", "badnets")
    assert (config.width, config.epochs, config.lr, config.batch_size, config.cosine_t_max) == (1.0, 50, 0.01, 128, 100)
    assert lr_at(config, 50, 0, 1) == pytest.approx(0.005)  # cosine with T_max = 100 stops halfway


def test_defender_resources_are_disjoint_seeded_and_sized():
    poison = np.arange(0, 1000, 10)
    a = defender_resources(1000, poison, 0, 0.05, 0.01, 200)
    assert (len(a.clean_subset), len(a.rnp_subset), len(a.unlabeled_pool)) == (50, 10, 200)
    assert a == defender_resources(1000, poison, 0, 0.05, 0.01, 200)


def test_unknown_preset_arch_and_attack_fail_early():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpu")
    with pytest.raises(KeyError, match="unknown attack"):
        train(preset_config("ci", "cifar10", "trojan"))
    with pytest.raises(KeyError, match="unknown model"):
        train(tiny(arch="alexnet"))
