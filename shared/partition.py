"""Graph surgery: where a network can be cut, and the head/tail halves of a cut.

The partitioner traces any ``torch.fx``-traceable ``nn.Module`` and lists its *legal* split
points; it never decides which one to use (that is the planner's job, see ``shared.planner``).

A cut sits between two consecutive *units* of the graph. A unit is the outermost submodule a node
belongs to, looking through plain containers (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``), so ``features.3`` of a MobileNetV2, ``layer2.1`` of a ResNet and
``_blocks.7`` of an EfficientNet are units, and a root-level function call (``torch.cat``,
``flatten``) is a unit of its own. Cutting inside a residual block is legal but never worth it:
the skip tensor would cross too.

A cut is legal when every value live across it is a floating-point tensor with the batch
dimension first, the network input is not among them (that is the ``cloud`` candidate), and
there are at most ``max_tensors`` of them. On branching graphs several tensors may cross; the head
returns all of them, in definition order, and the tail takes them in the same order.

    >>> from shared.models import resnet18
    >>> model, x = resnet18().eval(), torch.zeros(1, 3, 224, 224)
    >>> points = find_split_points(model, x)
    >>> head, tail = split_model(model, points[5], x)
    >>> torch.allclose(tail(*head(x)), model(x))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from shared.errors import PartitionError, UnknownSplitPointError
from shared.tensorspec import ALLOWED_DTYPES, TensorSpec

__all__ = ["Partitioner", "SplitPoint", "find_split_points", "split_model"]

# Containers whose forward only chains their children: never a unit themselves.
_TRANSPARENT: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_COMPUTE_OPS = frozenset({"call_module", "call_function", "call_method"})
_DTYPE_NAMES = {getattr(torch, name): name for name in ALLOWED_DTYPES}

Inputs = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class SplitPoint:
    """A legal cut: its stable ``name``, its position ``index`` in execution order, and the
    tensors that cross it (shapes as traced with the example input, batch dimension first)."""

    name: str
    index: int
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a split point needs a name")
        if self.index < 0:
            raise ValueError(f"split point index must be >= 0, got {self.index}")
        if not self.tensors:
            raise ValueError("at least one tensor crosses a split point")

    @property
    def float32_bytes(self) -> int:
        """Bytes the crossing tensors take as float32, per sample: the baseline to compress."""
        return sum(spec.float32_bytes for spec in self.tensors)


@dataclass(frozen=True)
class _Cut:
    point: SplitPoint
    position: int  # index in the graph's node list of the last node before the cut
    live: tuple[fx.Node, ...]


class Partitioner:
    """Traces a model once, lists its legal split points and builds heads and tails.

    Heads and tails are ``fx.GraphModule``s that share parameters with ``model``, so building a
    tail for every split point costs no extra weight memory.

        >>> from shared.models import mobilenet_v2
        >>> part = Partitioner(mobilenet_v2().eval(), torch.zeros(1, 3, 224, 224))
        >>> head, tail = part.split("features.7")
        >>> [p.name for p in part.points][:3]
        ['features.0', 'features.1', 'features.2']
    """

    def __init__(self, model: nn.Module, example_input: Inputs, *, max_tensors: int = 4) -> None:
        if max_tensors < 1:
            raise ValueError("max_tensors must be >= 1")
        inputs = _as_tuple(example_input)
        self.model = model
        self.graph_module = _trace(model)
        try:
            with torch.inference_mode():
                ShapeProp(self.graph_module).propagate(*inputs)
        except Exception as exc:  # any failure of the model itself on the example input
            raise PartitionError(f"running {type(model).__name__} on the example input failed: "
                                 f"{exc}") from exc
        self._batch = int(inputs[0].shape[0]) if inputs[0].dim() > 0 else 1
        self._cuts = self._find_cuts(max_tensors)
        self._by_name = {cut.point.name: cut for cut in self._cuts}

    @property
    def points(self) -> list[SplitPoint]:
        """The legal split points in execution order."""
        return [cut.point for cut in self._cuts]

    def point(self, key: str | int) -> SplitPoint:
        """Look a split point up by name or by index (an int, or a string of digits)."""
        return self._resolve(key).point

    def split(self, point: SplitPoint | str | int) -> tuple[fx.GraphModule, fx.GraphModule]:
        """Build ``(head, tail)`` for a split point: ``tail(*head(x))`` equals ``model(x)``."""
        cut = self._resolve(point)
        return self._build_head(cut), self._build_tail(cut)

    # -- finding cuts -----------------------------------------------------------------------

    def _find_cuts(self, max_tensors: int) -> list[_Cut]:
        gm = self.graph_module
        nodes = list(gm.graph.nodes)
        order = {node: i for i, node in enumerate(nodes)}
        last_use = {node: max((order[u] for u in node.users), default=-1) for node in nodes}
        compute = [i for i, node in enumerate(nodes) if node.op in _COMPUTE_OPS]
        cuts: list[_Cut] = []
        seen: dict[str, int] = {}
        for a, b in zip(compute, compute[1:], strict=False):
            unit = _unit(nodes[a], self.model)
            if unit == _unit(nodes[b], self.model):
                continue
            live = tuple(n for n in nodes[: a + 1] if n.op != "get_attr" and last_use[n] > a)
            specs = self._crossing_specs(live, max_tensors)
            if specs is None:
                continue
            seen[unit] = seen.get(unit, 0) + 1
            name = unit if seen[unit] == 1 else f"{unit}#{seen[unit]}"
            cuts.append(_Cut(SplitPoint(name, len(cuts), specs), a, live))
        if not cuts:
            raise PartitionError(f"{type(gm).__name__} has no legal split point")
        return cuts

    def _crossing_specs(self, live: Sequence[fx.Node], max_tensors: int
                        ) -> tuple[TensorSpec, ...] | None:
        if not live or len(live) > max_tensors:
            return None
        specs = []
        for node in live:
            meta = node.meta.get("tensor_meta")
            if node.op == "placeholder" or not isinstance(meta, TensorMetadata):
                return None  # the raw input, or a non-tensor value (an int, a tuple) crosses
            dtype = _DTYPE_NAMES.get(meta.dtype)
            shape = tuple(int(d) for d in meta.shape)
            if dtype is None or not shape or shape[0] != self._batch or min(shape) < 1:
                return None
            specs.append(TensorSpec(shape=(1, *shape[1:]), dtype=dtype))
        return tuple(specs)

    def _resolve(self, key: SplitPoint | str | int) -> _Cut:
        if isinstance(key, SplitPoint):
            cut = self._by_name.get(key.name)
            if cut is None or cut.point != key:
                raise UnknownSplitPointError(f"split point {key.name!r} does not belong to this "
                                             "model (or its shapes differ)")
            return cut
        # isascii: "²".isdigit() is True, but int("²") raises ValueError. The length check
        # comes first: int() of 4,301+ digits raises ValueError (CPython's conversion limit),
        # and no index has more than a few digits anyway.
        if isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit()):
            index = int(key) if isinstance(key, int) or len(key) <= 9 else -1
            if 0 <= index < len(self._cuts):
                return self._cuts[index]
        elif key in self._by_name:
            return self._by_name[key]
        shown = repr(key) if len(str(key)) <= 40 else repr(str(key)[:37] + "...")
        raise UnknownSplitPointError(
            f"no split point {shown}; valid: 0..{len(self._cuts) - 1} or a name such as "
            f"{', '.join(repr(c.point.name) for c in self._cuts[:3])}")

    # -- building halves --------------------------------------------------------------------

    def _build_head(self, cut: _Cut) -> fx.GraphModule:
        nodes = list(self.graph_module.graph.nodes)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in nodes[: cut.position + 1]:
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in cut.live))
        return _module(self.graph_module, graph, "Head")

    def _build_tail(self, cut: _Cut) -> fx.GraphModule:
        nodes = list(self.graph_module.graph.nodes)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {
            node: graph.placeholder(f"t{i}_{node.name}") for i, node in enumerate(cut.live)}

        def lookup(node: fx.Node) -> fx.Node:
            # Parameters and buffers read before the cut are re-read in the tail, not sent.
            if node not in env and node.op == "get_attr":
                env[node] = graph.get_attr(str(node.target))
            return env[node]

        for node in nodes[cut.position + 1:]:
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], lookup))
            elif node.op != "get_attr":
                env[node] = graph.node_copy(node, lookup)
        return _module(self.graph_module, graph, "Tail")


def find_split_points(model: nn.Module, example_input: Inputs, *, max_tensors: int = 4
                      ) -> list[SplitPoint]:
    """List the legal split points of ``model`` in execution order.

        >>> from shared.models import resnet18
        >>> [p.name for p in find_split_points(resnet18(), torch.zeros(1, 3, 224, 224))][:4]
        ['conv1', 'bn1', 'relu', 'maxpool']
    """
    return Partitioner(model, example_input, max_tensors=max_tensors).points


def split_model(model: nn.Module, point: SplitPoint | str | int, example_input: Inputs
                ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut ``model`` at ``point`` (a ``SplitPoint``, its name or its index).

    ``head(x)`` returns a tuple of tensors and ``tail(*head(x))`` equals ``model(x)``.
    """
    return Partitioner(model, example_input).split(point)


def _as_tuple(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise PartitionError("example_input must be a tensor or a sequence of tensors")
    return inputs


def _trace(model: nn.Module) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise PartitionError(f"expected an nn.Module, got {type(model).__name__}")
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... all mean "can't"
        raise PartitionError(f"{type(model).__name__} is not torch.fx-traceable: {exc}") from exc


def _module(root: fx.GraphModule, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    module = fx.GraphModule(root, graph, class_name=class_name)
    module.graph.eliminate_dead_code()  # the head drops work only the tail needed, and back
    module.recompile()
    module.eval()
    return module


def _unit(node: fx.Node, root: nn.Module) -> str:
    """The outermost non-container module ``node`` runs in, or the node itself at root level.

    ``root`` is the original model: a traced GraphModule replaces containers on the path to a
    leaf with plain ``nn.Module``s, so their types must come from the model or the trace record.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for entry in stack.values():
        path, cls = (entry[0], entry[1]) if isinstance(entry, tuple) else (str(entry), None)
        if not isinstance(cls, type):
            try:
                cls = type(root.get_submodule(path))
            except AttributeError:
                continue
        if cls not in _TRANSPARENT:
            return str(path)
    if node.op == "call_module":  # a leaf called from the root with no recorded stack
        return str(node.target)
    return node.name
