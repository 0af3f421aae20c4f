"""Scoring models on the protocol's test sets: build the clean and triggered sets once, score many.

``TestBench`` is what the CLI's ``evaluate`` and ``purify`` and the benchmark grid use to put numbers
before and after a defense side by side. Only the test split is touched here, and only for scoring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccpurify.attacks import Attack
from ccpurify.cost import ModelCost, model_cost
from ccpurify.data import DatasetSpec, Normalize, SourceInfo, get_spec, load_dataset
from ccpurify.errors import InvalidInputError
from ccpurify.metrics import BackdoorMetrics, der, evaluate
from ccpurify.probes import output_classes
from ccpurify.progress import ProgressCallback


@dataclass
class Score:
    """CA/ASR/RA (fractions) and cost of one model."""

    metrics: BackdoorMetrics
    cost: ModelCost

    def to_dict(self) -> dict:
        return {**self.metrics.to_dict(), **self.cost.to_dict()}


@dataclass
class TestBench:
    """The clean test set and, with an attack, the triggered non-target set."""

    spec: DatasetSpec
    images: np.ndarray
    labels: np.ndarray
    bd_images: np.ndarray | None
    bd_labels: np.ndarray | None
    target: int | None
    source: SourceInfo | None = None

    @classmethod
    def build(
        cls,
        dataset: str,
        attack: Attack | None = None,
        data_dir: str | os.PathLike | None = None,
        test_subset: int | None = None,
        seed: int = 0,
    ) -> TestBench:
        spec = get_spec(dataset)
        test = load_dataset(dataset, "test", data_dir)
        if test_subset is not None and test_subset < len(test):
            # The same seeded draw as training's ``test_subset`` (ccpurify.train._subset, salt 2).
            rng = np.random.default_rng([seed, 2])
            test = test.subset(np.sort(rng.choice(len(test), size=test_subset, replace=False)))
        bd_images = bd_labels = None
        if attack is not None:
            bd_images, bd_labels = attack.test_set(test.images, test.labels)
        target = attack.target if attack is not None else None
        return cls(spec, test.images, test.labels, bd_images, bd_labels, target, test.source)

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.spec.mean, self.spec.std)

    def score(self, model: nn.Module, progress: ProgressCallback | None = None) -> Score:
        """CA/ASR/RA and cost; refuses a model whose output size is not the dataset's class count.
        ``progress`` hears each batch scored (a full test split takes a while on a CPU)."""
        self.check_classes(model)
        metrics = evaluate(
            model,
            self.images,
            self.labels,
            self.bd_images,
            self.bd_labels,
            self.target,
            self.normalize,
            progress=progress,
        )
        size = self.spec.image_size
        cost = model.cost if isinstance(model, OnnxModel) else model_cost(model, (1, 3, size, size))
        return Score(metrics, cost)

    def check_classes(self, model: nn.Module) -> None:
        size = self.spec.image_size
        outputs = output_classes(model, torch.zeros(1, 3, size, size))
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.spec.num_classes):
            raise InvalidInputError(
                f"the test labels range {int(self.labels.min())}..{int(self.labels.max())}, outside "
                f"0..{self.spec.num_classes - 1} ({self.spec.name}'s {self.spec.num_classes} classes); the data is damaged"
            )
        if outputs != self.spec.num_classes:
            raise InvalidInputError(
                f"the model has {outputs} outputs but {self.spec.name} has {self.spec.num_classes} classes; "
                "pass the model's dataset (--dataset) or a model trained on this one"
            )


class OnnxModel(nn.Module):
    """An ONNX file scored like a PyTorch classifier: onnxruntime on the CPU computes the logits, so
    the file that ships (fp32 or INT8) is what CA and ASR are measured on, not the model it came from.
    Params and MACs are read from the graph (``exporters.graph_cost``)."""

    def __init__(self, path: str | os.PathLike, threads: int = 2) -> None:
        from exporters.graph_cost import onnx_cost
        from exporters.onnx_file import load_onnx, ort_session

        super().__init__()
        self.path = os.fspath(path)
        proto = load_onnx(path)
        try:
            graph_cost = onnx_cost(proto)
        except Exception as exc:  # shape inference rejects unknown ops and opsets in many ways
            raise InvalidInputError(f"{path}: the graph cannot be analysed ({str(exc).splitlines()[0][:160]})") from exc
        self.cost = ModelCost(params=graph_cost.params, macs=graph_cost.macs)
        self.session = ort_session(path, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InvalidInputError(f"{path}: a classifier takes one input; this file declares {len(inputs)}")
        batch = inputs[0].shape[0]
        self.input_name, self.fixed_batch = inputs[0].name, batch if isinstance(batch, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().numpy()
        step = self.fixed_batch or len(x)
        if len(x) % step:
            raise InvalidInputError(
                f"{self.path}: the file takes batches of exactly {step} images; re-export with a dynamic batch"
            )
        outs = [self.session.run(None, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        return torch.from_numpy(np.concatenate(outs))


def compare(before: Score, after: Score) -> dict:
    """Before/after numbers with DER and cost ratios (what ``purify`` prints)."""
    out = {"before": before.to_dict(), "after": after.to_dict()}
    b, a = before.metrics, after.metrics
    if b.asr is not None and a.asr is not None:
        out["der"] = der(b.ca, b.asr, a.ca, a.asr)
    out["params_ratio"] = after.cost.params / before.cost.params
    out["macs_ratio"] = after.cost.macs / before.cost.macs
    return out
