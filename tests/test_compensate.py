"""Data-free repair of compressed models: BN-statistics compensation, procedural and synthetic
transfer sets, anchored BN updates, and distillation from the suspect model that keeps silenced
channels silent."""

import copy
import math

import pytest
import torch
from torch import nn

from ccpurify.compensate import gaussian_compensation
from ccpurify.distill import agreement, anchored_bn_update
from ccpurify.errors import InvalidInputError
from ccpurify.passes import CLP, Pipeline, Prune, PurifyContext, Recover
from ccpurify.passes.recover import freeze_silenced_channels
from ccpurify.synthesis import bn_layers, class_histogram, dead_leaves, synthesize_bn_images
from ccpurify.transforms import Normalize


def two_bn_net(width: int = 8) -> nn.Sequential:
    """conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> pool -> linear, with BN statistics far from N(0, 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.uniform_(0.5, 1.5)  # large expected activations
        net[3].weight.abs_()  # the removed channels push every output the same way
        # the second BN's statistics are those of its input when the first BN's input follows its own
        # statistics, as training leaves them
        bn = net[1]
        x = torch.randn(256, width, 8, 8) * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
        z = net[3](net[2](bn.eval()(x)))
        net[4].running_mean.copy_(z.mean((0, 2, 3))), net[4].running_var.copy_(z.var((0, 2, 3)))
    return net.eval()


def keep_channels(net: nn.Sequential, keep: torch.Tensor) -> nn.Sequential:
    """``net`` with only the ``keep`` channels of its first BN (its producer and the conv inputs they feed)."""
    student = copy.deepcopy(net)
    producer, bn, consumer = student[0], student[1], student[3]
    with torch.no_grad():
        new_producer = nn.Conv2d(3, len(keep), 3, padding=1, bias=False)
        new_producer.weight.copy_(producer.weight[keep])
        new_bn = nn.BatchNorm2d(len(keep))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, attr).copy_(getattr(bn, attr)[keep])
        new_consumer = nn.Conv2d(len(keep), consumer.out_channels, 1, bias=False)
        new_consumer.weight.copy_(consumer.weight[:, keep])
    student[0], student[1], student[3] = new_producer, new_bn, new_consumer
    return student.eval()


def second_bn_output_moments(net: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = net[1:5](x)  # from the first BN's input to the second BN's output
    return out.mean((0, 2, 3)), out.var((0, 2, 3))


# ------------------------------------------------------------------------------- compensation
def test_compensation_keeps_the_next_layers_output_distribution_on_gaussian_inputs():
    teacher = two_bn_net()
    keep = torch.tensor([0, 2, 3, 5, 7])
    student = keep_channels(teacher, keep)
    bn = teacher[1]
    gaussian = torch.randn(512, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    x = gaussian * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
    want_mean, want_var = second_bn_output_moments(teacher, x)
    before_mean, _ = second_bn_output_moments(student, x[:, keep])
    assert (before_mean - want_mean).abs().max() > 0.5  # dropping channels shifted the next layer

    correspondence = {"1": keep, "4": torch.arange(4)}
    report = gaussian_compensation(student, teacher, correspondence, torch.zeros(1, 3, 8, 8), samples=256)
    mean, var = second_bn_output_moments(student, x[:, keep])
    assert report["layers"] == 2
    assert (mean - want_mean).abs().max() < 0.05
    assert torch.allclose(var, want_var, rtol=0.1)
    assert not student.training and not any(m._forward_pre_hooks for m in student.modules())


def test_compensation_is_idempotent_and_leaves_an_unpruned_model_unchanged():
    teacher = two_bn_net()
    student = keep_channels(teacher, torch.tensor([1, 2, 4, 6]))
    correspondence = {"1": torch.tensor([1, 2, 4, 6]), "4": torch.arange(4)}
    gaussian_compensation(student, teacher, correspondence, torch.zeros(1, 3, 8, 8))
    once = copy.deepcopy(student.state_dict())
    gaussian_compensation(student, teacher, correspondence, torch.zeros(1, 3, 8, 8))
    assert all(torch.allclose(v.float(), once[k].float(), atol=1e-4) for k, v in student.state_dict().items())

    twin = copy.deepcopy(teacher)
    gaussian_compensation(twin, teacher, {"1": torch.arange(8), "4": torch.arange(4)}, torch.zeros(1, 3, 8, 8))
    assert all(
        torch.allclose(v.float(), teacher.state_dict()[k].float(), atol=1e-6) for k, v in twin.state_dict().items()
    )


def test_prune_with_compensation_agrees_more_with_the_dense_model(ci_run, cifar_test):
    from ccpurify.data import CIFAR10, Normalize

    teacher = ci_run.model.eval()
    images = Normalize(CIFAR10.mean, CIFAR10.std)(
        torch.from_numpy(cifar_test.images[:500]).permute(0, 3, 1, 2).float() / 255
    )
    plain, _ = Prune(macs=0.6, global_pruning=True)(teacher)
    compensated, report = Prune(macs=0.6, global_pruning=True, compensate=True)(teacher)
    assert report.details.compensation["layers"] == sum(isinstance(m, nn.BatchNorm2d) for m in compensated.modules())
    assert agreement(compensated, teacher, images) > agreement(plain, teacher, images) + 0.05
    assert torch.equal(plain.conv1.weight, compensated.conv1.weight)  # same channels, only statistics moved


# ------------------------------------------------------------------------------ transfer sets
def test_dead_leaves_are_seeded_images_in_unit_range_with_a_natural_spectrum():
    images = dead_leaves(16, 32, seed=3)
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, dead_leaves(16, 32, seed=3)) and not torch.equal(images, dead_leaves(16, 32, seed=4))
    power = torch.fft.fft2(images - images.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    assert power[1, 1] > 10 * power[8, 8] > 10 * power[16, 16]  # energy falls with frequency, as in photographs
    with pytest.raises(ValueError):
        dead_leaves(4, shapes=0)


def test_dead_leaves_start_refined_towards_the_bn_statistics(ci_run):
    from ccpurify.data import CIFAR10, Normalize

    losses = []
    synthesize_bn_images(
        ci_run.model,
        32,
        (3, 32, 32),
        init="dead_leaves",
        steps=1,
        normalize=Normalize(CIFAR10.mean, CIFAR10.std),
        progress=lambda e: losses.append(e.metrics["bn_loss"]),
    )
    synthesize_bn_images(
        ci_run.model,
        32,
        (3, 32, 32),
        init="dead_leaves",
        steps=20,
        normalize=Normalize(CIFAR10.mean, CIFAR10.std),
        progress=lambda e: losses.append(e.metrics["bn_loss"]),
    )
    assert losses[1] < 0.5 * losses[0]
    counts = class_histogram(ci_run.model, dead_leaves(40, 32, seed=0), 10)
    assert counts.sum() == 40 and counts.shape == (10,)
    with pytest.raises(ValueError, match="init"):
        synthesize_bn_images(ci_run.model, 4, (3, 32, 32), init="fractal")


def test_anchored_bn_update_of_an_unchanged_copy_keeps_the_teachers_statistics():
    teacher = two_bn_net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[4].running_mean.zero_()  # stale statistics the update must overwrite
    images = torch.rand(64, 3, 8, 8)  # not the training data: the change, not the level, is measured
    anchored = anchored_bn_update(student, teacher, images, {"1": torch.arange(8), "4": torch.arange(4)})
    assert anchored == 2
    for i in (1, 4):
        assert torch.allclose(student[i].running_mean, teacher[i].running_mean, atol=1e-5)
        assert torch.allclose(student[i].running_var, teacher[i].running_var, rtol=1e-4)


# -------------------------------------------------------------------- distilling from the input
def test_silenced_channels_get_no_gradient():
    net = two_bn_net()
    with torch.no_grad():
        net[1].weight[2] = 0
        net[1].bias[2] = 0
        net[3].weight[1] = 0
    handles, channels = freeze_silenced_channels(net)
    assert channels == 2
    net.train()
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    assert net[1].weight.grad[2] == 0 and net[1].bias.grad[2] == 0 and net[3].weight.grad[1].abs().sum() == 0
    assert net[1].weight.grad.abs().sum() > 0
    for h in handles:
        h.remove()


def test_recover_from_the_input_model_keeps_what_the_defense_silenced(ci_run):
    from ccpurify.data import CIFAR10

    suspect = ci_run.model.eval()
    clp = CLP(u=1.0, mode="faithful")
    defended, _ = clp(suspect)
    silenced = {
        n: (m.weight == 0) & (m.bias == 0) for n, m in defended.named_modules() if isinstance(m, nn.BatchNorm2d)
    }
    assert sum(int(s.sum()) for s in silenced.values()) > 0
    pipeline = Pipeline(
        [
            clp,
            Recover(
                teacher_from="input",
                data="synthetic",
                synthetic_images=32,
                synthetic_steps=2,
                synthetic_init="dead_leaves",
                epochs=2,
                batch_size=16,
                guard=True,
                guard_scope="target",
            ),
        ]
    )
    context = PurifyContext(normalize=Normalize(CIFAR10.mean, CIFAR10.std))
    out, report = pipeline(suspect, context)
    details = report.passes[1].details
    assert details.teacher == "input" and details.frozen_silenced_channels > 0
    assert details.distill.guard_vetoed_fraction is not None  # CLP's output guarded the suspect teacher
    # the guard's scope: the class the suspect alone sends images to, counted on 4 views of the 32 images
    assert len(details.suspected_target["counts"]) == 10 and details.suspected_target["disagreements"] <= 128
    assert "recover" in report.budget() and "(32 synthetic images, 64 sample-steps)" in report.budget()
    for name, module in out.named_modules():
        if name in silenced and silenced[name].any():
            assert (module.weight[silenced[name]] == 0).all() and (module.bias[silenced[name]] == 0).all()
    assert context.pipeline_input is None  # restored after the pipeline


def test_a_guard_vetoes_the_teacher_on_every_image_where_they_disagree():
    from ccpurify.distill import distill

    teacher, student = two_bn_net(), two_bn_net()
    guard = copy.deepcopy(teacher)
    with torch.no_grad():  # the guard always prefers class 2, the teacher (before training) rarely does
        guard[8].bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
    images = torch.randn(64, 3, 8, 8)
    assert agreement(teacher, guard, images) < 0.9
    log = distill(
        student,
        teacher,
        images,
        epochs=30,
        batch_size=32,
        lr=0.05,
        guard=guard,
        generator=torch.Generator().manual_seed(0),
    )
    assert log.guard_vetoed_fraction > 0.1
    assert agreement(student, guard, images) > agreement(student, teacher, images)


def test_a_guard_that_skips_vetoed_images_teaches_nothing_on_them():
    """With ``vetoed="skip"``, an image on which the guard overrules the teacher adds nothing to the
    loss: where the two disagree everywhere, the student's weights do not move at all (no weight
    decay); with ``vetoed="guard"`` the student learns the guard's classes instead."""
    from ccpurify.distill import distill

    teacher = two_bn_net()
    guard = copy.deepcopy(teacher)
    images = torch.randn(64, 3, 8, 8)
    with torch.no_grad():  # the guard's class is never the teacher's
        top = teacher.eval()(images).argmax(1)
        guard[8].bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
    images = images[top != 2]
    options = dict(epochs=5, batch_size=16, lr=0.05, weight_decay=0.0, guard=guard)
    skipped, replaced = copy.deepcopy(teacher), copy.deepcopy(teacher)
    before = [p.detach().clone() for p in skipped.parameters()]
    log = distill(skipped, teacher, images, vetoed="skip", generator=torch.Generator().manual_seed(0), **options)
    assert log.guard_vetoed_fraction == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, skipped.parameters()))  # BN running statistics do move
    distill(replaced, teacher, images, vetoed="guard", generator=torch.Generator().manual_seed(0), **options)
    assert agreement(replaced, guard, images) > agreement(skipped, guard, images)
    with pytest.raises(ValueError, match="vetoed"):
        distill(skipped, teacher, images, vetoed="drop")


def test_the_suspected_target_is_the_class_the_suspect_alone_sends_images_to():
    """Given a guard that never predicts class c, every disagreement is an image the suspect sends
    to c: that is the suspected target. A guard that disagrees evenly names no class."""
    from ccpurify.distill import suspected_target

    teacher = two_bn_net()
    images = torch.randn(256, 3, 8, 8)
    with torch.no_grad():
        predicted = teacher.eval()(images).argmax(1)
    c = int(predicted.mode().values)
    never_c = copy.deepcopy(teacher)
    with torch.no_grad():
        never_c[8].bias[c] -= 100.0
    target, seen = suspected_target(teacher, never_c, images)
    assert target == c and seen["share"] == 1.0 and seen["disagreements"] == int((predicted == c).sum()) > 0

    class Shifted(nn.Module):  # predicts the teacher's class + 1: disagrees everywhere, evenly
        def forward(self, x):
            return teacher(x).roll(1, dims=1)

    target, seen = suspected_target(teacher, Shifted(), images)
    assert seen["disagreements"] == len(images) and (target is None) == (seen["share"] < 2 / 3)


def test_a_guard_scoped_to_one_class_overrules_the_teacher_only_there():
    from ccpurify.distill import distill

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))  # classes vary with the image
    images = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        teacher[2].bias.zero_()
    always_two = copy.deepcopy(teacher)
    with torch.no_grad():
        always_two[2].bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
        predicted = teacher.eval()(images).argmax(1)
    c = int(predicted[predicted != 2].mode().values)
    assert 0 < int((predicted == c).sum()) < int((predicted != 2).sum())  # the guard also disagrees elsewhere
    log = distill(copy.deepcopy(teacher), teacher, images, epochs=1, lr=0.0, guard=always_two, veto_class=c)
    assert log.guard_vetoed_fraction == pytest.approx(float((predicted == c).float().mean()))
    for bad in (3, -1, 2.5, True, "1"):  # a class the model does not have would silently veto nothing
        with pytest.raises(ValueError, match="veto_class"):
            distill(copy.deepcopy(teacher), teacher, images, epochs=1, guard=always_two, veto_class=bad)
    with pytest.raises(ValueError, match="guard"):
        distill(copy.deepcopy(teacher), teacher, images, epochs=1, veto_class=c)


def test_a_top_k_guard_lets_the_teacher_stand_where_it_ranks_the_teachers_class_among_its_k_best():
    """Given a teacher and a guard whose second choice is the teacher's class on some images and whose
    last choice is on others: with veto_topk=1 the guard overrules every disagreement, with
    veto_topk=2 only the images where the teacher's class is the guard's last."""
    from ccpurify.distill import _guarded_targets, distill

    teacher_logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    guard_logits = torch.tensor([[1.0, 3, 0], [0, 3, 1], [0, 3, 1]])  # 2nd, last, same
    _, top1 = _guarded_targets(teacher_logits, guard_logits, None)
    targets, top2 = _guarded_targets(teacher_logits, guard_logits, None, topk=2)
    assert top1.tolist() == [0, 0, 1] and top2.tolist() == [1, 0, 1]
    assert torch.equal(targets[0], teacher_logits[0]) and torch.equal(targets[1], guard_logits[1])
    with pytest.raises(ValueError, match="nothing to veto"):
        _guarded_targets(teacher_logits, guard_logits, None, topk=3)

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    guard = copy.deepcopy(teacher)
    with torch.no_grad():
        guard[2].weight.mul_(-1)
    images = torch.randn(128, 3, 4, 4)
    vetoed = [
        distill(
            copy.deepcopy(teacher), teacher, images, epochs=1, lr=0.0, guard=guard, veto_topk=k
        ).guard_vetoed_fraction
        for k in (1, 2, 3)
    ]
    assert vetoed[0] > vetoed[1] > vetoed[2] >= 0
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="veto_topk"):
            distill(copy.deepcopy(teacher), teacher, images, epochs=1, guard=guard, veto_topk=bad)
    with pytest.raises(ValueError, match="guard"):
        distill(copy.deepcopy(teacher), teacher, images, epochs=1, veto_topk=2)


def test_a_masked_veto_teaches_the_teachers_own_output_without_its_predicted_class():
    """Given a teacher whose class the guard overrules: with vetoed="masked" the target on that image is
    the teacher's softmax with its top class at 0 and the other classes in the teacher's own ratios;
    where the two agree the teacher's target stands untouched."""
    from ccpurify.distill import _guarded_targets, distill, without_prediction

    teacher_logits = torch.tensor([[6.0, 2, 1, 0], [0, 4, 1, 0]])
    guard_logits = torch.tensor([[0.0, 0, 5, 0], [0, 3, 0, 0]])  # overrules row 0, agrees on row 1
    targets, weights = _guarded_targets(teacher_logits, guard_logits, None, mask_vetoed=True)
    assert weights.tolist() == [0, 1] and torch.equal(targets[1], teacher_logits[1])
    for t in (1.0, 4.0):
        p = torch.softmax(targets[0] / t, 0)
        assert p[0] == 0 and p.argmax() == 1  # the teacher's second class, not the guard's class 2
        q = torch.softmax(teacher_logits[0, 1:] / t, 0)
        assert torch.allclose(p[1:], q, atol=1e-6)
    assert torch.equal(without_prediction(teacher_logits).argmax(1), torch.tensor([1, 2]))

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    with torch.no_grad():
        teacher[2].weight.mul_(5)
        teacher[2].bias.zero_()
    guard = copy.deepcopy(teacher)
    with torch.no_grad():  # the guard swaps classes 0 and 1: it overrules every image the teacher calls 0 or 1
        guard[2].weight.copy_(teacher[2].weight[[1, 0, 2, 3]])
    images = torch.randn(64, 3, 4, 4) * 2
    student = copy.deepcopy(teacher)
    log = distill(
        student,
        teacher,
        images,
        epochs=10,
        lr=0.1,
        guard=guard,
        vetoed="masked",
        generator=torch.Generator().manual_seed(0),
    )
    assert 0 < log.guard_vetoed_fraction < 1 and all(math.isfinite(v) for v in log.loss_per_epoch)
    with torch.no_grad():  # vetoed images moved away from the teacher's class; agreed ones kept it
        vetoed = teacher(images).argmax(1) != guard(images).argmax(1)
        changed = student(images).argmax(1) != teacher(images).argmax(1)
    assert changed[vetoed].float().mean() > 0.5 > changed[~vetoed].float().mean()


def test_a_class_the_guard_never_predicts_gets_back_the_uniform_share_and_no_other_class_moves():
    """Given logits where class 2 never wins but ranks its own images higher: dead_class_bias gives
    class 2 the smallest bias that makes it the prediction on ceil(N/K) images (exactly its best
    images), and 0 to every class that is predicted often enough."""
    from ccpurify.distill import LogitBias, dead_class_bias

    torch.manual_seed(0)
    n, classes = 90, 3
    logits = torch.randn(n, classes)
    logits[:, 2] -= 8.0  # class 2 is dead
    logits[:30, 2] += 3.0  # ... but its evidence is strongest on the first 30 images
    assert (logits.argmax(1) == 2).sum() == 0
    bias = dead_class_bias(logits)
    assert bias[0] == 0 and bias[1] == 0 and bias[2] > 0
    revived = (logits + bias).argmax(1) == 2
    assert int(revived.sum()) == 30 and revived[:30].float().mean() > 0.8
    assert torch.equal(dead_class_bias(logits + bias), torch.zeros(classes))  # nothing left to revive
    half = dead_class_bias(logits, share=0.5)  # half the uniform share: a smaller bias, 15 images
    assert 0 < half[2] < bias[2] and int(((logits + half).argmax(1) == 2).sum()) == 15
    with pytest.raises(InvalidInputError, match="share"):
        dead_class_bias(logits, share=0.0)
    alive = torch.eye(classes).repeat(n // classes, 1)  # every class predicted on a third
    assert torch.equal(dead_class_bias(alive), torch.zeros(classes))
    with pytest.raises(InvalidInputError, match="non-empty"):
        dead_class_bias(torch.zeros(0, 3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(4, 3, 2, 2)
    assert torch.allclose(LogitBias(model, bias)(x), model(x) + bias)


def test_a_guard_with_revived_classes_vetoes_less_and_records_its_biases():
    """Given a suspect and a guard that lost one class (its logit pushed down): Recover with
    guard_revive_classes ("guard": the bias on the guard's logits; "agreed": only on the suspect's
    predictions of that class) reports the dead class's bias and vetoes fewer images than without it."""
    torch.manual_seed(0)
    suspect = two_bn_net()
    guard = copy.deepcopy(suspect)
    with torch.no_grad():
        guard[8].bias[1] -= 20.0  # the guard never predicts class 1
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8))
    context.pipeline_input, context.teacher = suspect, guard
    vetoed = {}
    for revive in ("off", "guard", "agreed"):
        recover = Recover(
            teacher_from="input",
            guard=True,
            data="synthetic",
            synthetic_images=64,
            synthetic_steps=2,
            epochs=1,
            guard_revive_classes=revive,
        )
        details = recover.recover(copy.deepcopy(suspect), context)
        vetoed[revive] = details.distill.guard_vetoed_fraction
        if revive != "off":
            biases = details.guard_revived_classes
            assert 1 in biases and biases[1] == max(biases.values()) > 10
        else:
            assert details.guard_revived_classes is None
    assert vetoed["guard"] < vetoed["off"] and vetoed["agreed"] < vetoed["off"]
    assert guard[8].bias[1] < -10  # the caller's guard is not changed
    with pytest.raises(InvalidInputError, match="guard=True"):
        Recover(guard_revive_classes="agreed")
    with pytest.raises(InvalidInputError, match="guard_revive_classes"):
        Recover(teacher_from="input", guard=True, guard_revive_share=0.5)


def test_a_revive_bias_lets_only_the_teachers_own_prediction_of_the_revived_class_stand():
    """Given a guard that never predicts class 0 and a bias that revives it: where the teacher says 0
    and the biased guard agrees, the teacher's target stands; where the teacher says 0 but the biased
    guard does not, or says another class, the guard's own unbiased logits are the target."""
    from ccpurify.distill import _guarded_targets

    teacher = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    guard = torch.tensor([[-1.0, 0.5, 0.0], [-9.0, 0.5, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 4.0]])
    bias = torch.tensor([2.0, 0.0, 0.0])
    targets, weights = _guarded_targets(teacher, guard, None, revive_bias=bias)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(targets[0], teacher[0]) and torch.equal(targets[2], teacher[2])
    assert torch.equal(targets[1], guard[1]) and torch.equal(targets[3], guard[3])  # unbiased: class 0 not pushed
    shared, _ = _guarded_targets(teacher, guard, None, shared_temperature=4.0, revive_bias=bias)
    assert shared[0].argmax() == 0  # the shared knowledge is taken with the biased guard there


def test_shared_targets_keep_only_the_dark_knowledge_both_models_share():
    """Class by class the shared target is the smaller of the two probabilities, renormalised: where
    the models agree on the class it stays the prediction, a guard identical to the teacher changes
    nothing, and a lean towards one class that only the teacher has passes on to the student much
    weakened."""
    from ccpurify.distill import _guarded_targets, distill, shared_knowledge

    torch.manual_seed(0)
    teacher_logits, guard_logits = torch.randn(32, 5) * 3, torch.randn(32, 5) * 3
    for t in (1.0, 4.0):
        shared = torch.softmax(shared_knowledge(teacher_logits, guard_logits, t) / t, 1)
        smaller = torch.minimum(torch.softmax(teacher_logits / t, 1), torch.softmax(guard_logits / t, 1))
        assert torch.allclose(shared, smaller / smaller.sum(1, keepdim=True), atol=1e-6)
        same = shared_knowledge(teacher_logits, teacher_logits, t)
        assert torch.allclose(torch.softmax(same / t, 1), torch.softmax(teacher_logits / t, 1), atol=1e-6)
    agree = teacher_logits.argmax(1) == guard_logits.argmax(1)
    assert agree.any()
    # a guard scoped to class 2 lets the teacher's class 0 stand against its own class 1: no sharing there
    targets, weights = _guarded_targets(torch.tensor([[8.0, 0, 0]]), torch.tensor([[0.0, 8, 0]]), 2, 4.0)
    assert torch.equal(targets, torch.tensor([[8.0, 0, 0]])) and weights.item() == 1
    assert torch.equal(
        shared_knowledge(teacher_logits, guard_logits, 4.0)[agree].argmax(1), teacher_logits[agree].argmax(1)
    )

    guard = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        guard[2].weight.copy_(torch.eye(3) * 4)
        guard[2].bias.zero_()
    teacher = copy.deepcopy(guard)
    with torch.no_grad():  # the teacher leans every image towards class 2, short of changing its class
        teacher[2].bias[2] = 1.5
    images = torch.randn(256, 3, 4, 4) * 2
    leaning = {}
    for source, shared_targets in (("teacher", False), ("shared", True), ("guard", False)):
        student = copy.deepcopy(guard)
        with torch.no_grad():
            student[2].weight.mul_(0.5)
        options = dict(epochs=20, batch_size=64, lr=0.05, weight_decay=0.0, guard=guard)
        distill(
            student,
            guard if source == "guard" else teacher,
            images,
            shared_targets=shared_targets,
            generator=torch.Generator().manual_seed(0),
            **options,
        )
        with torch.no_grad():
            leaning[source] = float(student(images).softmax(1)[:, 2].mean())
    # renormalising gives the lean back in part (the other classes' shares fell with the teacher's)
    assert leaning["guard"] < leaning["shared"] < leaning["teacher"] - 0.05


def test_guard_options_are_refused_where_they_cannot_apply():
    from ccpurify.distill import distill, suspected_target
    from ccpurify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="teacher_from='input'"):
        Recover(guard=True)
    with pytest.raises(InvalidInputError, match="guard_[a-z_]* shapes the guard: it needs guard=True"):
        Recover(guard_scope="target")
    with pytest.raises(InvalidInputError, match="guard_[a-z_]* shapes the guard: it needs guard=True"):
        Recover(guard_targets="shared")
    with pytest.raises(InvalidInputError, match="guard_[a-z_]* shapes the guard: it needs guard=True"):
        Recover(guard_topk=2)
    with pytest.raises(InvalidInputError, match="guard_scope, guard_topk shape the guard: they need guard=True"):
        Recover(guard_scope="target", guard_topk=2)
    net = two_bn_net().train()  # three classes: a top-3 guard would veto nothing
    with pytest.raises(InvalidInputError, match="guard_topk below 3"):
        Recover(teacher_from="input", guard=True, guard_topk=3).check(
            net, PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8))
        )
    assert net.training  # the check ran the model without changing its mode
    Recover(teacher_from="input", guard=True, guard_topk=2).check(
        net, PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8))
    )
    teacher = two_bn_net()
    wider = nn.Sequential(teacher, nn.Linear(3, 10))
    with pytest.raises(ValueError, match="3 outputs and the guard 10"):  # the classes must be the same
        suspected_target(teacher, wider, torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="shared_targets"):
        distill(two_bn_net(), teacher, torch.randn(4, 3, 8, 8), epochs=1, shared_targets=True)


def test_hints_of_vetoed_images_count_only_when_the_veto_does_not_cover_them():
    """Given a guard that overrules the teacher on every image and skips them all: the student learns
    nothing while the veto covers the hints too (the default), and moves towards the hinted features
    with veto_hints=False."""
    from ccpurify.distill import FeatureHints, distill

    teacher = two_bn_net()
    guard = copy.deepcopy(teacher)
    with torch.no_grad():  # the same features, every class shifted by one: never the teacher's class
        guard[8].weight.copy_(teacher[8].weight[[1, 2, 0]])
        guard[8].bias.copy_(teacher[8].bias[[1, 2, 0]])
    images = torch.randn(32, 3, 8, 8)
    moved = {}
    for veto_hints in (True, False):
        student = two_bn_net()
        with torch.no_grad():
            student[1].weight.add_(0.5)
        before = copy.deepcopy(student.state_dict())
        hints = FeatureHints(guard, student, {"4": torch.arange(4)})
        log = distill(
            student,
            teacher,
            images,
            epochs=2,
            lr=0.05,
            weight_decay=0.0,
            guard=guard,
            vetoed="skip",
            hints=hints,
            feature_weight=1.0,
            veto_hints=veto_hints,
            generator=torch.Generator().manual_seed(0),
        )
        hints.remove()
        assert log.guard_vetoed_fraction == 1.0
        moved[veto_hints] = max(
            float((student.state_dict()[k] - v).abs().max())
            for k, v in before.items()
            if v.is_floating_point() and "running" not in k
        )
    assert moved[True] == 0 and moved[False] > 1e-3
    from ccpurify.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="hints_from='guard'"):
        Recover(teacher_from="input", guard=True, feature_weight=1.0, guard_vetoes_hints=False)


def test_feature_hints_ignore_images_of_weight_zero():
    from ccpurify.distill import FeatureHints

    teacher, student = two_bn_net(), two_bn_net()
    with torch.no_grad():
        student[0].weight.add_(0.5)  # the student's first BN input differs from the teacher's
    hints = FeatureHints(teacher, student, {"1": torch.arange(8)})
    x = torch.randn(4, 3, 8, 8)
    teacher(x), student(x)
    assert hints.loss() > 0 and hints.loss(torch.zeros(4)) == 0
    assert torch.allclose(hints.loss(torch.ones(4)), hints.loss())
    hints.remove()


def test_the_class_term_aims_synthetic_images_at_round_robin_classes():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    plain = synthesize_bn_images(net, 30, (3, 8, 8), steps=40, generator=torch.Generator().manual_seed(0))
    aimed = synthesize_bn_images(
        net, 30, (3, 8, 8), steps=40, class_weight=5.0, generator=torch.Generator().manual_seed(0)
    )
    targets = torch.arange(30) % 3
    with torch.no_grad():
        hit_plain = (net(plain).argmax(1) == targets).float().mean()
        hit_aimed = (net(aimed).argmax(1) == targets).float().mean()
    assert hit_aimed > 0.9 and hit_aimed > hit_plain


def test_a_guarded_recover_needs_a_defense_before_it():
    with pytest.raises(ValueError, match="guard"):
        Pipeline([Recover(teacher_from="input", guard=True, synthetic_images=8, synthetic_steps=0, epochs=1)])(
            two_bn_net(), PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8))
        )


# ------------------------------------------------------------------------------------ merging
class TwinNet(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> BN -> ReLU -> pool -> fc, where conv1's channels 8-15 are exact
    copies of channels 0-7 (filters and BN) whose conv2 input weights are small, so magnitude pruning
    removes the twins first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            (
                self.bn1.running_mean.uniform_(-0.5, 0.5),
                self.bn1.running_var.uniform_(0.5, 2),
                self.bn1.bias.uniform_(-0.5, 0.5),
            )
            self.conv1.weight[8:] = self.conv1.weight[:8]
            for t in (self.bn1.weight, self.bn1.bias, self.bn1.running_mean, self.bn1.running_var):
                t[8:] = t[:8]
            self.conv2.weight[:, 8:] *= 0.1
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_merging_a_duplicated_channel_into_its_twin_reproduces_the_logits():
    net = TwinNet()
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 16, 16))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    merged, report = Prune(macs=0.53, ignored=("conv2",), merge=True)(net, context)
    dropped, _ = Prune(macs=0.53, ignored=("conv2",))(net, context)
    assert merged.conv1.out_channels == 8 and report.details.merge["merged"] == 8
    assert report.details.merge["mean_similarity"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        assert (merged(x) - net(x)).abs().max() < 1e-4
        assert (dropped(x) - net(x)).abs().max() > 1e-2


def test_silenced_channels_are_never_merge_sources_or_targets():
    from ccpurify.graph import ChannelGraph
    from ccpurify.merge import merge_removed_channels

    net = TwinNet()
    with torch.no_grad():
        net.bn1.weight[9] = 0  # channel 9 silenced (as CLP/RNP leave it) ...
        net.bn1.bias[9] = 0
        net.bn1.weight[1] = 0  # ... and its twin too
        net.bn1.bias[1] = 0
    before = net.conv2.weight.clone()
    result = merge_removed_channels(net, ChannelGraph(net, torch.zeros(1, 3, 16, 16)), {"conv1": [9, 10]})
    assert result["merged"] == 1 and result["skipped"] == 1
    assert torch.equal(net.conv2.weight[:, 1], before[:, 1])  # nothing copied into the silenced twin
    assert torch.allclose(net.conv2.weight[:, 2], before[:, 2] + before[:, 10])  # channel 10 folded into its twin 2


def test_clipping_the_gradient_norm_bounds_every_step_of_the_distillation():
    """With ``max_grad_norm`` the global gradient norm of each step is at most that value, so plain
    SGD (no momentum, no weight decay) moves the weights by at most lr * max_grad_norm per step; the
    same run without the clip moves them far more."""
    from ccpurify.distill import FeatureHints, distill

    teacher, student = two_bn_net(), two_bn_net()
    with torch.no_grad():  # a student far from its teacher: large hint mismatch, large gradients
        for p in student.parameters():
            p.mul_(20.0)
    images = torch.randn(32, 3, 8, 8)
    correspondence = {name: torch.arange(bn.num_features) for name, bn in bn_layers(teacher)}

    def run(model, clip):
        hints = FeatureHints(teacher, model, correspondence)
        try:
            return distill(
                model,
                teacher,
                images,
                epochs=3,
                batch_size=32,
                lr=1.0,
                momentum=0.0,
                weight_decay=0.0,
                hints=hints,
                feature_weight=1000.0,
                max_grad_norm=clip,
                generator=torch.Generator().manual_seed(0),
            )
        finally:
            hints.remove()

    clipped = copy.deepcopy(student)
    before = torch.nn.utils.parameters_to_vector(clipped.parameters()).detach().clone()
    run(clipped, 0.01)
    moved = torch.nn.utils.parameters_to_vector(clipped.parameters()).detach() - before
    assert 0 < moved.norm() <= 3 * 1.0 * 0.01 + 1e-6
    unclipped = copy.deepcopy(student)
    run(unclipped, None)
    assert (torch.nn.utils.parameters_to_vector(unclipped.parameters()).detach() - before).norm() > 10 * moved.norm()
    with pytest.raises(ValueError, match="max_grad_norm"):
        distill(copy.deepcopy(student), teacher, images, max_grad_norm=0.0)


def test_hints_from_the_guard_pull_the_students_features_to_the_guards_not_the_suspects():
    """Given a suspect whose first conv differs from the guard's (same BN parameters, so every
    channel corresponds), hints matched to the guard leave a student that starts as the guard with
    the guard's first-layer features; hints matched to the suspect pull them to the suspect's."""
    guard = two_bn_net().eval()
    suspect = copy.deepcopy(guard)
    with torch.no_grad():
        suspect[0].weight.add_(0.5 * torch.randn_like(suspect[0].weight))
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), pipeline_input=suspect, teacher=guard)
    options = {
        "teacher_from": "input",
        "guard": True,
        "data": "synthetic",
        "synthetic_images": 64,
        "synthetic_steps": 0,
        "feature_weight": 100.0,
        "max_grad_norm": 10.0,
        "recalibrate": False,
        "augment": False,
        "epochs": 20,
        "batch_size": 32,
    }
    gap = {}
    for source in ("guard", "teacher"):
        student, report = Recover(hints_from=source, **options)(guard, context)
        assert report.details.feature_layers == 2
        with torch.no_grad():
            gap[source] = float(
                (student[0].weight - suspect[0].weight).norm() / (guard[0].weight - suspect[0].weight).norm()
            )
    assert gap["teacher"] < 0.8 * gap["guard"]
    assert gap["guard"] > 0.9  # the suspect's first-layer features were not taught
    with pytest.raises(InvalidInputError, match="needs guard=True and feature_weight > 0"):
        Recover(teacher_from="input", hints_from="guard")
    with pytest.raises(InvalidInputError, match="needs guard=True and feature_weight > 0"):
        Recover(teacher_from="input", guard=True, hints_from="guard")  # no hints to take from the guard


def test_agreement_compares_in_eval_mode_and_leaves_the_models_modes_as_they_were():
    a, b = two_bn_net().train(), copy.deepcopy(two_bn_net()).eval()
    a[1].eval()  # a frozen BatchNorm inside a training model
    images = torch.randn(16, 3, 8, 8)
    assert agreement(a, b, images) == 1.0  # the same weights: in eval mode they agree everywhere
    assert a.training and not a[1].training and a[4].training and not b.training
    assert all(p.requires_grad for p in a.parameters())
    with pytest.raises(InvalidInputError, match="at least one image"):
        agreement(a, b, images[:0])


def test_a_teacher_on_another_device_is_copied_there_and_the_callers_model_stays_put():
    from ccpurify.passes.recover import on_device

    net = two_bn_net()
    assert on_device(net, "cpu") is net  # already there: used as it is
    moved = on_device(net, "meta")
    assert moved is not net and next(moved.parameters()).device.type == "meta"
    assert all(t.device.type == "cpu" for t in [*net.parameters(), *net.buffers()])


def test_counting_a_models_classes_runs_it_where_it_is():
    """``output_classes`` (which the plan and ``Recover(guard_topk=)``'s check call on the caller's
    model) moves the example to the model, never the model to the example's device."""
    from ccpurify.probes import output_classes

    net = two_bn_net().to("meta")
    assert output_classes(net, torch.zeros(1, 3, 8, 8)) == net[-1].out_features
    assert next(net.parameters()).device.type == "meta"
