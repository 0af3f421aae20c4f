"""Poisoned training: produce a backdoored (or clean) model and its run directory.

``train(config, out_dir)`` loads the dataset, poisons it with the configured attack (static attacks
once, up front; WaNet and Input-aware per batch), trains with SGD from a seed, evaluates CA/ASR/RA,
and writes a run directory:

=========================  =================================================================
``manifest.json``          config, seed, versions, data checksums, files + sha256, wall time
``model.safetensors``      the final-epoch model (``ccpurify.io`` format: arch + weights)
``attack.json``            the attack recipe; ``attack.safetensors`` its trigger tensors
``poison_indices.json``    the poisoned training indices (empty for batch-level attacks)
``defender.json``          the defender's clean labelled subset, RNP subset and unlabelled pool
``metrics.json``           CA / ASR / RA, params, MACs, per-epoch training history
``checkpoint.pt``          while training only: resumable state (weights-only torch.save)
=========================  =================================================================

Presets (docs/protocol.md, "Presets"): ``ci`` (seconds, a data subset, a tiny model), ``cpu`` (the
benchmark zoo, ~20 minutes on 2 cores), ``paper`` (BackdoorBench's PreAct-ResNet18 recipe).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from ccpurify import attacks, models
from ccpurify.atomic import atomic_path, write_json
from ccpurify.data import Augment, ImageSet, Normalize, get_spec, load_dataset, to_float
from ccpurify.errors import CcpurifyError, InvalidInputError, InvalidTypeError, NonFiniteError
from ccpurify.evaluation import TestBench
from ccpurify.io import ArchRef, save_model
from ccpurify.progress import ProgressCallback, report
from ccpurify.provenance import PROTOCOL_VERSION, git_commit, machine, now, sha256_of, versions


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in its manifest)."""

    dataset: str = "cifar10"
    attack: str | None = "badnets"  # None trains a clean model
    attack_options: dict = field(default_factory=dict)
    target: int = 0
    poison_ratio: float = 0.1
    arch: str = "preact_resnet18"
    width: float = 1.0
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # "cosine" (per epoch, T_max = cosine_t_max), "onecycle" (per step), "constant"
    cosine_t_max: int | None = 100  # BackdoorBench uses T_max = 100 whatever the epoch count
    warmup: float = 0.2  # onecycle: fraction of steps spent rising to ``lr``
    label_smoothing: float = 0.0
    augment: bool = True  # the protocol's crop (+ flip on CIFAR-10); ci turns it off to learn fast
    train_subset: int | None = None  # train on a seeded random subset of this size (ci)
    test_subset: int | None = None  # evaluate on a seeded random subset of this size (ci)
    defender_clean_fraction: float = 0.05  # labelled clean subset for defenses (protocol)
    rnp_fraction: float = 0.01  # RNP's share, taken from the clean subset
    unlabeled_pool: int = 5000  # unlabelled images for BCU
    seed: int = 0
    device: str = "cpu"
    channels_last: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        """Refuse settings that would train for nothing or score a meaningless run (exit code 0)."""
        classes = get_spec(self.dataset).num_classes
        if not 0 <= self.target < classes:
            raise InvalidInputError(f"target must be a class of {self.dataset} (0 to {classes - 1}), got {self.target}")
        positive = dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            width=self.width,
            lr=self.lr,
            train_subset=self.train_subset,
            test_subset=self.test_subset,
        )
        for name, value in positive.items():
            if value is not None and (isinstance(value, bool) or not math.isfinite(value) or value <= 0):
                raise InvalidInputError(f"{name} must be a positive number, got {value}")
        for name, value in dict(
            poison_ratio=self.poison_ratio,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            momentum=self.momentum,
        ).items():
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise InvalidInputError(f"{name} must be a number in [0, 1], got {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the fields that change the result (device and layout excluded)."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("device", "channels_last")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _preset_ci(dataset: str) -> dict:
    # ~30 s on 2 cores. Without augmentation a 3x3 patch is learned in 8 epochs on 5,000 images
    # (ASR 90-94% over seeds 0-2, CA ~50%); with crop/flip it is not, at this budget.
    return dict(
        width=0.125,
        epochs=8,
        batch_size=128,
        lr=0.1,
        schedule="onecycle",
        nesterov=True,
        augment=False,
        train_subset=5000,
        test_subset=1000,
        unlabeled_pool=500,
    )


def _preset_cpu(dataset: str) -> dict:
    # Chosen by measurement on 2 cores (README "Presets"): ~80 s per CIFAR-10 epoch. WaNet is the
    # exception that does not reach 90% ASR: 69.7% after 15 epochs, and fewer (54.7%) after 30, as
    # the noise-mode samples teach the model to ignore warps; the zoo keeps the 15-epoch model.
    return dict(
        width=0.25,
        epochs=15 if dataset == "cifar10" else 10,
        batch_size=128,
        lr=0.1,
        schedule="onecycle",
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.0,
    )


def _preset_paper(dataset: str) -> dict:
    return dict(
        width=1.0,
        epochs=100 if dataset == "cifar10" else 50,
        batch_size=128,
        lr=0.01,
        schedule="cosine",
        cosine_t_max=100,
        nesterov=False,
        channels_last=False,
    )


PRESETS = {"ci": _preset_ci, "cpu": _preset_cpu, "paper": _preset_paper}

# Attack settings a preset adjusts for its compute budget (the reference values stay the defaults).
_ATTACK_PRESETS = {
    ("ci", "input_aware"): dict(width=4, mask_epochs=1),
    ("cpu", "input_aware"): dict(width=8, mask_epochs=2),
}


def preset_config(preset: str, dataset: str = "cifar10", attack: str | None = "badnets", **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a preset for a dataset and attack, with ``overrides`` applied."""
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    get_spec(dataset)
    values = dict(PRESETS[preset](dataset), dataset=dataset, attack=attack, preset=preset)
    attack_options = dict(_ATTACK_PRESETS.get((preset, attack), {}))
    attack_options.update(overrides.pop("attack_options", None) or {})
    values["attack_options"] = attack_options
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise InvalidTypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
    values.update(overrides)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------ resources
@dataclass
class DefenderResources:
    """Indices (into the training split) of what a defender may use (protocol, "Defender resources")."""

    clean_subset: list[int]
    rnp_subset: list[int]
    unlabeled_pool: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def defender_resources(
    num_train: int, poison_indices: np.ndarray, seed: int, clean_fraction: float, rnp_fraction: float, unlabeled: int
) -> DefenderResources:
    """Seeded, disjoint draws from the non-poisoned training indices: the clean labelled subset
    (``clean_fraction`` of the split), RNP's subset (its first ``rnp_fraction`` of the split) and
    the unlabelled pool."""
    rng = np.random.default_rng([seed, 0xDEF])
    candidates = np.setdiff1d(np.arange(num_train), poison_indices)
    order = rng.permutation(candidates)
    n_clean = min(int(round(clean_fraction * num_train)), len(order))
    n_rnp = min(int(round(rnp_fraction * num_train)), n_clean)
    n_unlabeled = min(unlabeled, len(order) - n_clean)
    clean = order[:n_clean]
    return DefenderResources(
        clean_subset=sorted(int(i) for i in clean),
        rnp_subset=sorted(int(i) for i in clean[:n_rnp]),
        unlabeled_pool=sorted(int(i) for i in order[n_clean : n_clean + n_unlabeled]),
    )


# ------------------------------------------------------------------------------------- schedule
def lr_at(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for ``step`` of ``epoch`` (0-based) under the configured schedule."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        t_max = config.cosine_t_max or config.epochs
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(epoch, t_max) / t_max))
    if config.schedule == "onecycle":
        total = config.epochs * steps_per_epoch
        t = epoch * steps_per_epoch + step
        rise = max(1, int(config.warmup * total))
        if t < rise:
            return config.lr * (t + 1) / rise
        return config.lr * max(0.0, (total - t) / max(1, total - rise))
    raise InvalidInputError(f"unknown schedule {config.schedule!r}; use cosine, onecycle or constant")


# ----------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict
    run_dir: Path | None
    attack: attacks.Attack | None


class RunExistsError(CcpurifyError, FileExistsError):
    pass


def _subset(data: ImageSet, size: int | None, seed: int, salt: int) -> ImageSet:
    if size is None or size >= len(data):
        return data
    rng = np.random.default_rng([seed, salt])
    return data.subset(np.sort(rng.choice(len(data), size=size, replace=False)))


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a (backdoored) model as ``config`` says; write the run directory when ``out_dir`` is set.

    A run interrupted after an epoch resumes from ``out_dir/checkpoint.pt`` when the config matches.
    """
    started = time.perf_counter()
    models.MODELS.get(config.arch)  # unknown names fail before any data is read
    if config.attack is not None:
        attacks.ATTACKS.get(config.attack)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_out_dir(out, config, overwrite)
    spec = get_spec(config.dataset)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    generator = _seed_everything(config.seed)

    train_full = load_dataset(config.dataset, "train", data_dir)
    train_set = _subset(train_full, config.train_subset, config.seed, 1)

    attack, images, labels, poison_idx = _poisoned(config, train_set)
    resources = defender_resources(
        len(train_set),
        poison_idx,
        config.seed,
        config.defender_clean_fraction,
        config.rnp_fraction,
        config.unlabeled_pool,
    )

    torch.manual_seed(config.seed)
    model = models.create(config.arch, num_classes=spec.num_classes, width=config.width).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    start_epoch, history = 0, []
    checkpoint = out / "checkpoint.pt" if out is not None else None
    if checkpoint is not None and checkpoint.is_file():
        start_epoch, history, attack_tensors = _resume(checkpoint, model, optimizer, generator)
        if attack is not None and attack_tensors:
            attack = attacks.from_recipe(attack.recipe(), attack_tensors)  # trained trigger parts
    elif attack is not None:
        attack.prepare(images, batch_size=config.batch_size, device=device, progress=progress)
    poisoner = attack.batch_poisoner(device) if attack is not None else None
    if poisoner is not None and checkpoint is not None and checkpoint.is_file():
        _resume_poisoner(checkpoint, poisoner)

    augment = Augment(crop_padding=4 if config.augment else 0, hflip=spec.hflip and config.augment)
    normalize = Normalize(spec.mean, spec.std)
    data = torch.from_numpy(images)
    targets = torch.from_numpy(labels)
    if len(data) < config.batch_size:  # drop_last, as BackdoorBench
        raise InvalidInputError(f"batch_size {config.batch_size} is larger than the {len(data)} training images")

    resumed_seconds = sum(h.get("seconds", 0.0) for h in history)  # epochs trained before an interruption
    loop = _Epochs(
        config,
        model,
        optimizer,
        data,
        targets,
        poisoner,
        augment,
        normalize,
        generator,
        device,
        memory_format,
        checkpoint,
        progress,
    )
    for epoch in range(start_epoch, config.epochs):
        history.append(loop.run(epoch))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, config, model, optimizer, generator, attack, poisoner, epoch + 1, history)

    if poisoner is not None:
        poisoner.finish()
    model = model.eval().to(memory_format=torch.contiguous_format)
    report(progress, "evaluate", 0, 1)
    bench = TestBench.build(config.dataset, attack, data_dir, config.test_subset, config.seed)
    score = bench.score(model)
    report(
        progress, "evaluate", 1, 1, ca=score.metrics.ca, asr=score.metrics.asr if attack is not None else float("nan")
    )
    metrics = {**score.to_dict(), "history": history, "protocol": PROTOCOL_VERSION}
    wall = time.perf_counter() - started + resumed_seconds  # a resumed run counts its earlier epochs too
    metrics["train_wall_time_s"] = wall
    if out is not None:
        _write_run(out, config, model, attack, poison_idx, resources, metrics, train_full, bench, train_set, wall)
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
    return TrainResult(model=model.cpu(), metrics=metrics, run_dir=out, attack=attack)


def _poisoned(config: TrainConfig, train_set: ImageSet):
    """The attack (None for a clean run) and the training images and labels it poisoned, with the
    poisoned indices."""
    if config.attack is None:
        return None, train_set.images, train_set.labels, np.empty(0, dtype=np.int64)
    attack = attacks.create(
        config.attack, target=config.target, poison_ratio=config.poison_ratio, seed=config.seed, **config.attack_options
    )
    poisoned = attack.poison(train_set.images, train_set.labels)
    return attack, poisoned.images, poisoned.labels, poisoned.poison_indices


@dataclass
class _Epochs:
    """The training loop's fixed parts; ``run(epoch)`` trains one epoch (BackdoorBench's loop: SGD,
    drop-last batches, per-step learning rate, the attack's batch poisoner) and returns its history row."""

    config: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: torch.Tensor
    targets: torch.Tensor
    poisoner: object | None
    augment: Augment
    normalize: Normalize
    generator: torch.Generator
    device: torch.device
    memory_format: torch.memory_format
    checkpoint: Path | None
    progress: ProgressCallback | None

    def run(self, epoch: int) -> dict:
        config, started = self.config, time.perf_counter()
        steps = len(self.data) // config.batch_size
        self.model.train()
        perm = torch.randperm(len(self.data), generator=self.generator)
        seen = correct = 0
        loss_sum = 0.0
        for step in range(steps):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(config, epoch, step, steps)
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            loss, logits, y = self._step(epoch, step, idx)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if step % 10 == 9 or step == steps - 1:
                report(
                    self.progress,
                    f"train {epoch + 1}/{config.epochs}",
                    step + 1,
                    steps,
                    loss=loss_sum / seen,
                    acc=correct / seen,
                )
        if self.poisoner is not None:
            self.poisoner.end_epoch()
        return {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "acc": correct / seen,
            "lr_end": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }

    def _step(self, epoch: int, step: int, idx: torch.Tensor):
        x, y = to_float(self.data[idx]).to(self.device), self.targets[idx].to(self.device)
        extra = None
        if self.poisoner is not None:
            x, y, extra = self.poisoner(x, y, self.generator)
        x = self.normalize(self.augment(x, self.generator)).contiguous(memory_format=self.memory_format)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        total = loss if extra is None else loss + extra
        if not torch.isfinite(total):
            kept = (
                f"{self.checkpoint} keeps epoch {epoch}"
                if self.checkpoint is not None and self.checkpoint.is_file()
                else "nothing was written"
            )
            raise NonFiniteError(
                f"training diverged at epoch {epoch + 1} step {step + 1}: loss is {float(total.detach())}; {kept}; "
                "lower --lr or check the data and the attack's parameters"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.poisoner is not None:
            self.poisoner.step()
        return loss, logits, y


# ------------------------------------------------------------------------------ checkpoint & run
def _check_out_dir(out: Path, config: TrainConfig, overwrite: bool) -> None:
    manifest = out / "manifest.json"
    if manifest.is_file() and not overwrite:
        raise RunExistsError(f"{out} already holds a finished run; choose another --out or pass --overwrite")
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != config.fingerprint():
            if not overwrite:
                raise RunExistsError(
                    f"{out} holds a checkpoint of a different configuration; choose another --out or pass --overwrite"
                )
            checkpoint.unlink()


def _save_checkpoint(path, config, model, optimizer, generator, attack, poisoner, epoch, history) -> None:
    state = {
        "fingerprint": config.fingerprint(),
        "epoch": epoch,
        "history_json": json.dumps(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "attack": attack.tensors() if attack is not None else {},
        "poisoner_optimizer": poisoner.opt.state_dict() if hasattr(poisoner, "opt") else {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path, model, optimizer, generator) -> tuple[int, list, dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), json.loads(state["history_json"]), state["attack"]


def _resume_poisoner(path, poisoner) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(poisoner, "opt") and state["poisoner_optimizer"]:
        poisoner.opt.load_state_dict(state["poisoner_optimizer"])


def _write_run(out, config, model, attack, poison_idx, resources, metrics, train_full, bench, train_set, wall) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(config.dataset)
    extra = {
        "dataset": config.dataset,
        "num_classes": spec.num_classes,
        "normalize": {"mean": list(spec.mean), "std": list(spec.std)},
        "run": {"attack": config.attack, "target": config.target, "seed": config.seed, "preset": config.preset},
    }
    arch = ArchRef(name=config.arch, kwargs={"num_classes": spec.num_classes, "width": config.width})
    save_model(
        model, out / "model.safetensors", arch, input_shape=(1, 3, spec.image_size, spec.image_size), extra=extra
    )
    if attack is not None:
        write_json(out / "attack.json", attack.recipe())
        with atomic_path(out / "attack.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in attack.tensors().items()}, os.fspath(tmp))
    # Indices refer to the full training split, also when a subset was trained on.
    full_index = train_set.indices if train_set.indices is not None else np.arange(len(train_set))
    write_json(out / "poison_indices.json", [int(full_index[i]) for i in poison_idx])
    res = DefenderResources(
        *[
            [int(full_index[i]) for i in lst]
            for lst in (resources.clean_subset, resources.rnp_subset, resources.unlabeled_pool)
        ]
    )
    write_json(out / "defender.json", res.to_dict())
    write_json(out / "metrics.json", metrics)
    files = ["model.safetensors", "poison_indices.json", "defender.json", "metrics.json"]
    if attack is not None:
        files += ["attack.json", "attack.safetensors"]
    manifest = {
        "kind": "ccpurify.train",
        "protocol": PROTOCOL_VERSION,
        "created": now(),
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": versions(),
        "git_commit": git_commit(),
        "machine": machine(),
        "data": {"train": train_full.source.to_dict(), "test": bench.source.to_dict() if bench.source else None},
        "train_size": len(train_set),
        "wall_time_s": wall,
        "metrics": {k: metrics[k] for k in ("ca", "asr", "ra", "params", "macs")},
        "files": {name: sha256_of(out / name) for name in files},
    }
    write_json(out / "manifest.json", manifest)


# -------------------------------------------------------------------------------------- run dirs
@dataclass
class RunDir:
    """A finished training run read back from disk (what defenses and the benchmark consume)."""

    path: Path
    manifest: dict
    config: TrainConfig
    attack: attacks.Attack | None
    defender: DefenderResources

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    def load_model(self) -> torch.nn.Module:
        from ccpurify.io import load_model

        return load_model(self.model_path)


def open_run(path: str | os.PathLike) -> RunDir:
    """Read a run directory written by ``train`` (the model itself is loaded on demand)."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no manifest.json); train one with `ccpurify train`")
    try:
        manifest = json.loads(manifest_file.read_text())
        config = TrainConfig(**manifest["config"])
        attack = None
        if (path / "attack.json").is_file():
            recipe = json.loads((path / "attack.json").read_text())
            attack = attacks.from_recipe(recipe, load_file(os.fspath(path / "attack.safetensors")))
        defender = DefenderResources(**json.loads((path / "defender.json").read_text()))
    except CcpurifyError as exc:
        raise InvalidInputError(f"{path}: damaged run directory: {exc}") from exc
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, SafetensorError) as exc:
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{path}: damaged run directory ({what}); re-create it with `ccpurify train`") from exc
    return RunDir(path, manifest, config, attack, defender)
