"""Channel graph: which output channels of which layers are coupled, which BatchNorm normalises
which conv, and physical removal of channels through torch-pruning's ``DependencyGraph``.

Facts this module is built on (docs/reference/ecosystem.md §1.2, §7):

- The BN that normalises a conv's output is found in the conv's out-channel group as the item whose
  dependency *source* is the conv itself and whose target is a BatchNorm. Module order is never
  used (that is CLP's reference bug on pre-activation ResNets).
- A channel is *internal* when its group has a single writer (conv/linear whose output channels are
  pruned) and at most that writer's BN: then zeroing the BN's gamma and beta and removing the channel
  give the same logits. Residual adds, depthwise chains and concatenations make channels *coupled*.
- Indices go stale after a prune (removing [7] then [9] of one group removes 7 and 10), so every
  index is mapped to its group root on the unpruned model and each group is pruned once.
- Modules torch-pruning does not know are traced as element-wise ops and their loose parameters
  pruned along a guessed dimension; any group that touches such a parameter is *blocked*: reported
  and left untouched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch
import torch_pruning as tp
from torch import nn

from ccpurify.errors import CcpurifyError
from ccpurify.probes import check_static_graph
from ccpurify.recipe import register_edit

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WRITER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Leaf modules with parameters whose channel handling torch-pruning implements.
SUPPORTED_PARAM_TYPES = (*WRITER_TYPES, *NORM_TYPES, nn.PReLU, nn.LayerNorm, nn.GroupNorm)


class Coupling(str, Enum):
    """How a layer's output channels are tied to the rest of the network."""

    INTERNAL = "internal"  # conv -> (BN) -> act -> consumers; removal is exact
    RESIDUAL = "residual"  # written by several layers into an add (a residual stream)
    ELEMENTWISE = "elementwise"  # several writers joined by another element-wise op (e.g. SE gating)
    DEPTHWISE = "depthwise"  # passes through a depthwise conv (and its BN) before the next writer
    CONCAT = "concat"  # concatenated with other layers' channels
    OUTPUT = "output"  # the model's output (class logits): never removed
    BLOCKED = "blocked"  # touches a layer torch-pruning cannot edit: left untouched


class RemovalPolicy(str, Enum):
    """What ``remove_channels`` does with selected channels of *coupled* layers.

    Internal channels are always removed physically (exact).
    """

    SOFT = "soft"  # zero the writer's contribution (its BN gamma/beta, else its filter): no removal
    GROUP = "group"  # remove a coupled channel only if every writer of the group selected it; zero the rest
    HARD = "hard"  # remove every selected channel with its whole coupled group


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and not _is_depthwise(m)


@dataclass(frozen=True)
class LayerInfo:
    """One conv/linear layer's output channels as the graph sees them."""

    name: str
    type: str
    out_channels: int
    bn: str | None  # the BatchNorm that normalises exactly this layer's output
    coupling: Coupling
    group: tuple[str, ...]  # every writer whose output channels are removed together with these
    reason: str | None = None  # why it is blocked / output

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coupling"] = self.coupling.value
        return d


@dataclass(frozen=True)
class UnsupportedLayer:
    name: str
    type: str
    reason: str


@dataclass
class LayerChange:
    """What ``remove_channels`` did to one requested layer (indices refer to the original layer)."""

    layer: str
    coupling: str
    requested: list[int]
    removed: list[int] = field(default_factory=list)
    zeroed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    reason: str | None = None


@dataclass
class RemovalReport:
    policy: str
    changes: list[LayerChange]
    history: list[list]  # torch-pruning history [root_name, is_out_channel, idxs], replayable

    @property
    def removed(self) -> int:
        return sum(len(c.removed) for c in self.changes)

    @property
    def zeroed(self) -> int:
        return sum(len(c.zeroed) for c in self.changes)

    def edit(self) -> dict:
        """The replayable structural edit (``ccpurify.io``)."""
        return {"op": "remove_channels", "history": self.history}

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "removed": self.removed,
            "zeroed": self.zeroed,
            "changes": [asdict(c) for c in self.changes],
            "history": self.history,
        }


class GraphEditError(CcpurifyError, RuntimeError):
    """A structural edit produced a model that no longer runs on the example input."""


@dataclass
class _GroupFacts:
    """The evidence a layer's coupling is decided from (``ChannelGraph._classify``)."""

    bn: str | None = None
    writers: list[str] = field(default_factory=list)
    reason: str | None = None  # why the layer cannot be edited, when it cannot
    add: bool = False
    other_elementwise: bool = False
    concat: bool = False
    depthwise: bool = False
    output: bool = False

    def note_operation(self, target, name: str) -> None:
        """Record what kind of operation a group member is (torch-pruning's node types)."""
        kind = tp.ops.OPTYPE
        if target.type in (kind.PARAMETER, kind.CUSTOMIZED):
            self.reason = f"touches an unwrapped parameter or custom layer ({name})"
        elif target.type in (kind.LSTM, kind.MHA, kind.EMBED):
            self.reason = f"touches a {target.type.name} layer"
        elif target.type == kind.OUTPUT:
            self.output = True
        elif target.type == kind.CONCAT:
            self.concat = True
        elif target.type == kind.ELEMENTWISE and target.grad_fn is not None:
            op = type(target.grad_fn).__name__
            self.add |= op.startswith(("Add", "Sub"))
            self.other_elementwise |= op.startswith(("Mul", "Div"))

    def coupling(self, module: nn.Module) -> tuple[Coupling, str | None]:
        """Blocked beats output beats residual beats depthwise beats element-wise beats concat."""
        shared = len(self.writers) > 1
        if self.reason is not None:
            return Coupling.BLOCKED, self.reason
        if self.output:
            return Coupling.OUTPUT, "feeds the model output"
        if shared and self.add:
            return Coupling.RESIDUAL, None
        if (shared and _is_depthwise(module)) or self.depthwise:
            return Coupling.DEPTHWISE, None
        if shared or self.other_elementwise:
            return Coupling.ELEMENTWISE, None
        return (Coupling.CONCAT if self.concat else Coupling.INTERNAL), None


class ChannelGraph:
    """Dependency graph of a model's channels, over torch-pruning's ``DependencyGraph``.

    >>> graph = ChannelGraph(model, torch.zeros(1, 3, 32, 32))
    >>> graph.bn_of("layer1.0.conv1")              # PreAct-ResNet18: 'layer1.0.bn2'
    >>> graph.layers["layer1.0.conv2"].coupling     # Coupling.RESIDUAL
    >>> report = graph.remove_channels({"layer1.0.conv1": [3, 7]}, policy="group")

    The graph edits ``model`` in place; passes hand it a copy.
    """

    def __init__(
        self, model: nn.Module, example_inputs: torch.Tensor, ignored_layers: Iterable[nn.Module] = ()
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.unsupported = self._find_unsupported(model)
        # Layers never to edit stay in the traced graph (torch-pruning would otherwise trace through
        # them as element-wise ops); every group that touches one is blocked instead.
        self._ignored = set(ignored_layers) | {m for m in model.modules() if _is_grouped(m)}
        was_training = model.training
        model.eval()
        try:
            check_static_graph(model, example_inputs, "the channel graph (pruning, layer pairing)")
            with torch.enable_grad():  # the graph is traced through autograd (asserts grad mode)
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
                with torch.no_grad():
                    self._output_shape = tuple(model(example_inputs).shape)
        finally:
            model.train(was_training)
        self._names = {m: n for n, m in model.named_modules()}
        self._analyze()

    # ----------------------------------------------------------------------------------- analysis
    @staticmethod
    def _find_unsupported(model: nn.Module) -> list[UnsupportedLayer]:
        out = []
        for name, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if _is_grouped(m):
                out.append(UnsupportedLayer(name, type(m).__name__, f"grouped conv (groups={m.groups})"))
            elif own and not isinstance(m, SUPPORTED_PARAM_TYPES):
                out.append(UnsupportedLayer(name, type(m).__name__, "unknown layer with parameters"))
        return out

    def _out_fn(self, module: nn.Module):
        return self.dg.get_pruner_of_module(module).prune_out_channels

    def _analyze(self) -> None:
        self.layers: dict[str, LayerInfo] = {}
        # (layer name) -> (root module, {local idx: root idx}) for every prunable writer
        self._root_map: dict[str, tuple[nn.Module, dict[int, int]]] = {}
        self._group_writers: dict[int, list[str]] = {}
        for group in self.dg.get_all_groups(ignored_layers=list(self._ignored), root_module_types=WRITER_TYPES):
            root = group[0].dep.target.module
            writers = []
            for item in group:
                module = item.dep.target.module
                if isinstance(module, WRITER_TYPES) and self.dg.is_out_channel_pruning_fn(item.dep.handler):
                    name = self._names[module]
                    if name not in self._root_map:
                        writers.append(name)
                        self._root_map[name] = (root, dict(zip(item.idxs, item.root_idxs)))
            self._group_writers[id(root)] = writers
        for name, module in self.model.named_modules():
            if not isinstance(module, WRITER_TYPES):
                continue
            if module in self.dg.module2node:
                self.layers[name] = self._classify(name, module)
            else:
                out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                self.layers[name] = LayerInfo(
                    name, type(module).__name__, out, None, Coupling.BLOCKED, (name,), "not used in the forward pass"
                )

    def _classify(self, name: str, module: nn.Module) -> LayerInfo:
        out_channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        if module in self._ignored:
            why = f"grouped conv (groups={module.groups})" if _is_grouped(module) else "ignored layer"
            return LayerInfo(name, type(module).__name__, out_channels, None, Coupling.BLOCKED, (name,), why)
        group = self.dg.get_pruning_group(module, self._out_fn(module), [0])
        facts = self._group_facts(module, group)
        if name not in facts.writers:
            facts.writers.insert(0, name)
        consumers = [
            item
            for item in group
            if self.dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, WRITER_TYPES)
        ]
        facts.output |= not consumers  # nothing reads these channels but the model's caller
        coupling, reason = facts.coupling(module)
        return LayerInfo(name, type(module).__name__, out_channels, facts.bn, coupling, tuple(facts.writers), reason)

    def _group_facts(self, module: nn.Module, group) -> _GroupFacts:
        """What the channel group of ``module``'s outputs touches: its BatchNorm, the layers that write
        the same channels, and the operations (add, concat, depthwise, output) that couple them."""
        facts = _GroupFacts()
        for item in group:
            dep, target = item.dep, item.dep.target
            tmod = target.module
            facts.note_operation(target, self._names.get(tmod, type(tmod).__name__))
            if isinstance(tmod, NORM_TYPES) and dep.source.module is module and facts.bn is None:
                facts.bn = self._names[tmod]
            facts.depthwise |= _is_depthwise(tmod) and tmod is not module
            if (
                isinstance(tmod, WRITER_TYPES)
                and self.dg.is_out_channel_pruning_fn(dep.handler)
                and self._names[tmod] not in facts.writers
            ):
                facts.writers.append(self._names[tmod])
            if tmod in self._ignored and tmod is not module:
                facts.reason = (
                    f"coupled with {'grouped conv' if _is_grouped(tmod) else 'ignored layer'} {self._names.get(tmod)}"
                )
        return facts

    # --------------------------------------------------------------------------------- queries
    def bn_of(self, layer: str | nn.Module) -> str | None:
        """Name of the BatchNorm that normalises exactly ``layer``'s output, or None."""
        return self.layers[self._name(layer)].bn

    def consumers(self, layer: str | nn.Module) -> list[str]:
        """Names of the conv/linear layers that read ``layer``'s output channels as their input channels."""
        module = self.module(self._name(layer))
        group = self.dg.get_pruning_group(module, self._out_fn(module), [0])
        names = [
            self._names[item.dep.target.module]
            for item in group
            if self.dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, WRITER_TYPES)
        ]
        return list(dict.fromkeys(names))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv, BN) pairs derived from the graph, in module order."""
        return [(n, info.bn) for n, info in self.layers.items() if info.bn is not None and info.type.startswith("Conv")]

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _name(self, layer: str | nn.Module) -> str:
        if isinstance(layer, nn.Module):
            if layer not in self._names:
                raise KeyError("layer is not part of this graph's model")
            return self._names[layer]
        if layer not in self.layers:
            raise KeyError(f"{layer!r} is not a conv/linear layer of the model; known: {list(self.layers)[:6]}...")
        return layer

    def summary(self) -> dict:
        counts: dict[str, int] = defaultdict(int)
        for info in self.layers.values():
            counts[info.coupling.value] += 1
        return {
            "layers": len(self.layers),
            "couplings": dict(counts),
            "bn_pairs": len(self.conv_bn_pairs()),
            "unsupported": [asdict(u) for u in self.unsupported],
        }

    # ------------------------------------------------------------------------------------ editing
    def zero_channels(self, layer: str | nn.Module, indices: Sequence[int], at_filter: bool = False) -> None:
        """Silence output channels of ``layer``: its paired BN's gamma and beta set to 0 when there is
        one (CLP's reference operation), else, or with ``at_filter``, the filters and bias (a
        pre-activation stem's BN is only one reader of its conv: the shortcut carries the output on)."""
        name = self._name(layer)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if len(idx) == 0:
            return
        with torch.no_grad():
            bn_name = None if at_filter else self.layers[name].bn
            target = self.module(bn_name) if bn_name is not None else self.module(name)
            target.weight[idx] = 0
            if target.bias is not None:
                target.bias[idx] = 0

    def remove_channels(
        self, selection: Mapping[str | nn.Module, Sequence[int]], policy: RemovalPolicy | str = RemovalPolicy.GROUP
    ) -> RemovalReport:
        """Physically remove output channels (and every dependent slice) of the selected layers.

        Indices refer to the model as it is now. Internal channels are removed; coupled ones follow
        ``policy``; blocked and output layers are left untouched and reported.
        """
        policy = RemovalPolicy(policy)
        plan, roots, changes = self._removal_plan(selection)
        to_remove = self._apply_policy(plan, policy, changes)
        history = self._prune_groups(to_remove, roots, plan, changes)
        if history:
            self._verify()
            self._analyze()
        return RemovalReport(policy.value, list(changes.values()), history)

    def _removal_plan(self, selection: Mapping[str | nn.Module, Sequence[int]]):
        """Selected channels mapped onto their group roots: root id -> root index -> the writers that
        asked for it; the roots by id; one ``LayerChange`` per selected layer (blocked ones skipped)."""
        plan: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        roots: dict[int, nn.Module] = {}
        changes: dict[str, LayerChange] = {}
        for layer, indices in selection.items():
            name = self._name(layer)
            info = self.layers[name]
            idxs = sorted({int(i) for i in indices})
            if idxs and (idxs[0] < 0 or idxs[-1] >= info.out_channels):
                raise IndexError(f"{name} has {info.out_channels} output channels; got indices {idxs[:3]}...{idxs[-1]}")
            change = changes[name] = LayerChange(name, info.coupling.value, idxs)
            if not idxs:
                continue
            if info.coupling in (Coupling.BLOCKED, Coupling.OUTPUT) or name not in self._root_map:
                change.skipped, change.reason = idxs, info.reason or "not prunable"
                continue
            root, mapping = self._root_map[name]
            roots[id(root)] = root
            for i in idxs:
                plan[id(root)][mapping[i]].add(name)
        return plan, roots, changes

    def _apply_policy(self, plan, policy: RemovalPolicy, changes: dict[str, LayerChange]) -> dict[int, list[int]]:
        """Root indices to remove physically: a single writer's always; coupled ones by ``policy``
        (HARD: any; GROUP: when every writer of the group selected it); the rest are only silenced
        in the writers that asked (SOFT)."""
        to_remove: dict[int, list[int]] = {}
        for rid, per_idx in plan.items():
            writers = self._group_writers[rid]
            single = len(writers) == 1 and self.layers[writers[0]].coupling in (Coupling.INTERNAL, Coupling.CONCAT)
            remove = []
            for ridx, selected_by in per_idx.items():
                if (
                    single
                    or policy is RemovalPolicy.HARD
                    or (policy is RemovalPolicy.GROUP and set(writers) <= selected_by)
                ):
                    remove.append(ridx)
                    continue
                for w in selected_by:  # soft: silence this writer's contribution only
                    local = self._local_index(w, ridx)
                    self.zero_channels(w, [local])
                    changes[w].zeroed.append(local)
            if remove:
                to_remove[rid] = sorted(remove)
        return to_remove

    def _prune_groups(
        self, to_remove: dict[int, list[int]], roots: dict[int, nn.Module], plan, changes: dict[str, LayerChange]
    ) -> list[list]:
        """Remove the channels group by group through torch-pruning; a group that would leave a layer
        with no channels is skipped and reported. Returns the pruning history (replayable)."""
        history: list[list] = []
        for rid, ridxs in to_remove.items():
            root = roots[rid]
            group = self.dg.get_pruning_group(root, self._out_fn(root), ridxs)
            possible = self.dg.check_pruning_group(group)
            for w in self._group_writers[rid]:
                if w not in changes:
                    continue
                local = [self._local_index(w, r) for r in ridxs if w in plan[rid][r]]
                if possible:
                    changes[w].removed += local
                else:
                    changes[w].skipped += local
                    changes[w].reason = "removing them would leave a layer with no channels"
            if possible:
                group.prune()
                history.append([self._names[root], True, [int(i) for i in ridxs]])
        return history

    def _local_index(self, writer: str, root_idx: int) -> int:
        _, mapping = self._root_map[writer]
        for local, r in mapping.items():
            if r == root_idx:
                return local
        raise KeyError(root_idx)

    def _verify(self) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                shape = tuple(self.model(self.example_inputs).shape)
        except RuntimeError as exc:
            raise GraphEditError(f"the model no longer runs after removing channels: {exc}") from exc
        finally:
            self.model.train(was_training)
        if shape != self._output_shape:
            raise GraphEditError(f"removing channels changed the output shape {self._output_shape} -> {shape}")


def apply_history(model: nn.Module, history: list[list], example_inputs: torch.Tensor) -> nn.Module:
    """Replay a removal history ([root_name, is_out_channel, idxs], in order) on a fresh model."""
    if not history:
        return model
    model.eval()
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    for root_name, is_out, idxs in history:
        module = model.get_submodule(root_name)
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        dg.get_pruning_group(module, fn, list(idxs)).prune()
    return model


@register_edit("remove_channels")
def _replay_remove_channels(model: nn.Module, edit: dict, example_inputs: torch.Tensor) -> nn.Module:
    return apply_history(model, edit["history"], example_inputs)
