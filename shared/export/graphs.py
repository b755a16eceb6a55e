"""torch.fx partition -> one ONNX "probe" graph -> the whole model, every head and every tail.

The model is exported once, as the traced graph of ``shared.partition`` with every tensor that
crosses any split point added as an output (the probe). Heads and tails are then cut out of the
probe with ``onnx.utils.Extractor``, by value name, so they are exactly the partitioner's halves
and share one set of weights. (One head graph serving every split point through its outputs does
not work: ONNX Runtime runs the whole graph whatever outputs are requested, so the head of the
first split point would cost the whole model.)

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), which takes an
``fx.GraphModule`` like any module; the batch dimension is dynamic in every graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
from onnx import utils as onnx_utils
from torch import fx

from shared.errors import ExportError
from shared.partition import Partitioner, SplitPoint

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "ProbeGraph", "export_probe"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: 18: the first opset the dynamo exporter targets natively (17 would be a down-conversion).
OPSET = 18
_MAX_BATCH = 4096


@dataclass(frozen=True)
class ProbeGraph:
    """The exported probe and, per split point (in index order), the ONNX names of the tensors
    that cross it, in the order the head returns them and the tail takes them."""

    model: onnx.ModelProto
    points: tuple[SplitPoint, ...]
    crossing: tuple[tuple[str, ...], ...]

    def extractor(self) -> onnx_utils.Extractor:
        return onnx_utils.Extractor(self.model)


def export_probe(part: Partitioner, example: torch.Tensor) -> ProbeGraph:
    """Export ``part``'s model with every crossing tensor as an extra output."""
    module, names, crossing = _probe_module(part)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    try:
        with _quiet():
            program = torch.onnx.export(
                module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, *names],
                dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET, verbose=False)
    except Exception as exc:  # torch.export and onnxscript raise many kinds; all mean "can't"
        raise ExportError(f"torch.onnx.export failed for {type(part.model).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                          ) from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    _strip_debug_metadata(model)
    _unalias(model, set(names))
    outputs = [o.name for o in model.graph.output]
    if outputs != [OUTPUT_NAME, *names]:
        raise ExportError(f"the exported graph's outputs are {outputs[:4]}..., not the ones "
                          "asked for")
    return ProbeGraph(model, tuple(part.points), crossing)


def extract(extractor: onnx_utils.Extractor, inputs: list[str], outputs: list[str]
            ) -> onnx.ModelProto:
    """The subgraph from ``inputs`` to ``outputs``; raises ``ExportError`` if it needs more
    inputs than those (a value computed before the cut that is not among the crossing tensors).
    """
    model = extractor.extract_model(inputs, outputs)
    got = [i.name for i in model.graph.input]
    produced = {o for node in model.graph.node for o in node.output}
    needed = {i for node in model.graph.node for i in node.input if i}
    known = produced | set(got) | {t.name for t in model.graph.initializer}
    if got != inputs or needed - known:
        raise ExportError(f"the subgraph {inputs[:2]}... -> {outputs[:2]}... is not closed: "
                          f"it also needs {sorted(needed - known)[:3]}")
    return model


def _probe_module(part: Partitioner
                  ) -> tuple[fx.GraphModule, list[str], tuple[tuple[str, ...], ...]]:
    gm = part.graph_module
    by_name = {node.name: node for node in gm.graph.nodes}
    order: list[fx.Node] = []  # every crossing node once, in first-crossing order
    crossing_nodes: list[tuple[fx.Node, ...]] = []
    for point in part.points:
        head, _ = part.split(point)
        outs = _output_args(head)
        # The head's nodes are copies of the traced graph's, under the same names.
        nodes = tuple(by_name.get(n.name) for n in outs)
        if any(n is None for n in nodes):
            raise ExportError(f"cannot map the tensors crossing {point.name!r} back to the graph")
        live = tuple(n for n in nodes if n is not None)
        crossing_nodes.append(live)
        order.extend(n for n in live if n not in order)
    names = {node: f"cross{i}_{node.name}" for i, node in enumerate(order)}

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    result = None
    for node in gm.graph.nodes:
        if node.op == "output":
            result = fx.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output((result, *(env[n] for n in order)))
    module = fx.GraphModule(gm, graph, class_name="Probe")
    module.eval()
    crossing = tuple(tuple(names[n] for n in live) for live in crossing_nodes)
    return module, [names[n] for n in order], crossing


def _strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug notes: stack traces with the exporting machine's file
    paths, fx node text, module hierarchies. A bundle is handed to every device; they are
    most of a small graph file's bytes, and nothing reads them at run time."""
    for node in model.graph.node:
        del node.metadata_props[:]


def _unalias(model: onnx.ModelProto, crossing: set[str]) -> None:
    """Make later nodes read a crossing output rather than the value it is an alias of.

    A module that is the identity in eval mode (dropout) leaves ``Identity(x) -> y`` in the
    graph, with ``y`` the crossing output and every later node reading ``x``: the tail cut at
    ``y`` would then need ``x``, which is not among its inputs. After this, later nodes read
    ``y``, and the ``Identity`` sits right after the node that makes ``x``.
    """
    nodes = list(model.graph.node)
    for alias in [n for n in nodes if n.op_type == "Identity" and n.output[0] in crossing]:
        source, target = alias.input[0], alias.output[0]
        for node in nodes:
            if node is not alias and source in node.input:
                renamed = [target if i == source else i for i in node.input]
                del node.input[:]
                node.input.extend(renamed)
        nodes.remove(alias)
        where = next((k + 1 for k, n in enumerate(nodes) if source in n.output), 0)
        nodes.insert(where, alias)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _output_args(module: fx.GraphModule) -> tuple[fx.Node, ...]:
    for node in module.graph.nodes:
        if node.op == "output":
            args = node.args[0]
            return tuple(args) if isinstance(args, tuple | list) else (args,)
    raise ExportError("a head has no output node")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporter prints progress, logs that torchvision is absent and raises deprecation
    # warnings from its own internals: none of it is the user's business on the command line.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
