"""Function-preserving compression without data: repair what removing channels changed, from the
BatchNorm statistics alone.

A pruned network collapses (validation CA 13-17% on the CIFAR-10 zoo models at 0.75 MACs) mostly
because every BatchNorm after a pruned layer still normalises with statistics of a sum that lost
terms: the removed channels' expected activations shift its mean (DFQ's bias correction, Nagel et
al., ICCV 2019; "mean replacement") and their variance shrinks its spread. Both shifts can be
measured without images, because each BatchNorm's running statistics describe its input on the
training data:

``gaussian_compensation`` runs the dense model and the compressed one side by side on *Gaussian
replacement* inputs: every BatchNorm's input is replaced (in both models, with the same samples on
corresponding channels) by draws from N(running_mean, running_var), so each layer sees inputs that
match what it was trained on, and what reaches the next BatchNorm differs only by the channels that
were removed in between. The compressed model's BatchNorm statistics are then moved by what changed,
``mean = mean_dense + (mean_s - mean_t)`` and ``var = var_dense * var_s / var_t`` on the
layer's input, and the output layer's
bias by the mean change of the logits. This folds each removed channel's expected contribution
(E[ReLU(BN(x))] under the BN's Gaussian, times the consumer's weights) into the next BatchNorm, and
corrects the variance where the independent-Gaussian model can derive it; it works for any graph
(residual sums, concatenation, depthwise) because it only needs the channel correspondence.
"""

from __future__ import annotations

import torch
from torch import nn

from ccpurify.distill import eval_forward_with_pre_hooks
from ccpurify.errors import InvalidInputError
from ccpurify.synthesis import bn_layers, moments


@torch.no_grad()
def gaussian_compensation(
    student: nn.Module,
    teacher: nn.Module,
    correspondence: dict[str, torch.Tensor],
    example_inputs: torch.Tensor,
    *,
    samples: int = 64,
    variance: bool = True,
    output_bias: bool = True,
    seed: int = 0,
) -> dict:
    """Set ``student``'s BatchNorm running statistics to ``teacher``'s (on corresponding channels)
    moved by what compression changed, measured on Gaussian replacement inputs, and shift its output
    layer's bias by the change of the mean logits. Idempotent: statistics are set, not accumulated.

    ``correspondence`` maps each student BatchNorm name to the teacher channel index of each of its
    channels (``ccpurify.distill.channel_correspondence``); BatchNorm layers not in it are left as
    they are and see their real input. Both models run in eval mode on ``samples`` all-zero images of
    ``example_inputs``'s shape (the first BatchNorm's input is replaced too, so the images do not
    matter). Returns what was changed: the number of layers, the mean absolute mean shift relative
    to the running std, and the output bias shift."""
    teacher_bns, student_bns = dict(bn_layers(teacher)), dict(bn_layers(student))
    names = [n for n in student_bns if n in correspondence and n in teacher_bns]
    if not names:
        raise InvalidInputError("no BatchNorm layer of the compressed model corresponds to one of the dense model")
    device = next(student.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    replacement: dict[str, torch.Tensor] = {}
    measured: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {"teacher": {}, "student": {}}

    def replace(role: str, name: str, bn: nn.modules.batchnorm._BatchNorm):
        def hook(module: nn.Module, args: tuple) -> torch.Tensor:
            x = args[0]
            measured[role][name] = moments(x)
            if role == "teacher":
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                std = bn.running_var.add(bn.eps).sqrt().view(1, -1, 1, 1)
                replacement[name] = noise * std + bn.running_mean.view(1, -1, 1, 1)
                return replacement[name]
            return replacement[name][:, correspondence[name].to(x.device)]

        return hook

    # Measure from the state compression left (each kept channel with the dense model's statistics),
    # so that the result does not depend on earlier changes to the student's statistics.
    base = {
        n: (
            teacher_bns[n].running_mean[correspondence[n]].to(device),
            teacher_bns[n].running_var[correspondence[n]].to(device),
        )
        for n in names
    }
    saved = {n: (student_bns[n].running_mean.clone(), student_bns[n].running_var.clone()) for n in names}
    for n in names:
        student_bns[n].running_mean.copy_(base[n][0])
        student_bns[n].running_var.copy_(base[n][1])
    x = torch.zeros(samples, *example_inputs.shape[1:], dtype=example_inputs.dtype, device=device)
    outputs = {}
    try:
        for role, model, bns in (("teacher", teacher, teacher_bns), ("student", student, student_bns)):
            hooks = {bns[n]: replace(role, n, teacher_bns[n]) for n in names}
            outputs[role] = eval_forward_with_pre_hooks(model, x.to(next(model.parameters()).device), hooks).to(device)
    except BaseException:
        for n in names:
            student_bns[n].running_mean.copy_(saved[n][0])
            student_bns[n].running_var.copy_(saved[n][1])
        raise

    shifts = []
    for name in names:
        bn, idx = student_bns[name], correspondence[name].to(device)
        mean_t, var_t = (v.to(device)[idx] for v in measured["teacher"][name])
        mean_s, var_s = measured["student"][name]
        shift = mean_s - mean_t
        shifts.append((shift.abs() / bn.running_var.add(bn.eps).sqrt()).mean())
        bn.running_mean.add_(shift)
        if variance:
            bn.running_var.mul_((var_s + bn.eps) / (var_t + bn.eps))
    logit_shift = 0.0
    if output_bias and outputs["teacher"].shape == outputs["student"].shape:
        layer = _output_layer(student, x)
        if layer is not None:
            delta = (outputs["teacher"] - outputs["student"]).mean(0)
            layer.bias.add_(delta)
            logit_shift = float(delta.abs().mean())
    return {"layers": len(names), "mean_shift": float(torch.stack(shifts).mean()), "logit_bias_shift": logit_shift}


def _output_layer(model: nn.Module, x: torch.Tensor) -> nn.Linear | None:
    """The ``nn.Linear`` with a bias whose output is the model's output (the classifier), if any."""
    produced: list[tuple[torch.Tensor, nn.Linear]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: produced.append((out, mod)))
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.bias is not None
    ]
    was_training = model.training
    try:
        out = model.eval()(x[:1].to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return next((mod for o, mod in produced if o is out), None)
