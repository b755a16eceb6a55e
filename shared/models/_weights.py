"""Reading checkpoints safely and fitting them to a model, with errors that say what is wrong.

Checkpoints are read with ``torch.load(..., weights_only=True)`` and nothing else: the file can
hold tensors and plain containers, never a reference to code. Every failure becomes a
``WeightsError``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from shared.errors import WeightsError

__all__ = ["load_checkpoint", "load_into", "unwrap_state_dict"]

# Training scripts save {"model": sd, "optimizer": ..., "epoch": ...} or {"state_dict": sd}.
_WRAPPER_KEYS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."
_SHOWN = 5  # keys named in an error message; the rest are counted
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``torch.save`` file, refusing anything but tensors and containers.

    With a torchvision checkpoint on disk::

        sd = load_checkpoint("resnet18-f37072fd.pth")
        sd["fc.weight"].shape          # torch.Size([1000, 512])
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"no checkpoint at {os.fspath(path)!r}") from exc
    except pickle.UnpicklingError as exc:
        # What weights_only=True raises for a file that names code (a class, os.system, ...).
        # torch's message mostly advises weights_only=False, which we never do: keep the name.
        named = _GLOBAL_RE.search(str(exc))
        what = f"it refers to {named.group(1)}" if named else "it holds more than tensors"
        raise WeightsError(
            f"checkpoint {os.fspath(path)!r} is refused: {what}; "
            "only tensors in plain containers are loaded"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"cannot read checkpoint {os.fspath(path)!r}: {exc}") from exc
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded checkpoint and normalize its keys.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` or ``"model"``, and strips
    the ``"module."`` prefix that ``nn.DataParallel`` adds to every key.

        >>> unwrap_state_dict({"state_dict": {"module.fc.bias": torch.zeros(2)}})
        {'fc.bias': tensor([0., 0.])}
    """
    for _ in range(2):  # e.g. {"model": {"state_dict": sd}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint is a {type(obj).__name__}, not a state dict")
    if not obj:
        raise WeightsError("checkpoint holds an empty state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"checkpoint is not a state dict: entry {key!r} is a {type(value).__name__}"
            )
        state[key] = value
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state):
        state = {key.removeprefix(_DATA_PARALLEL_PREFIX): v for key, v in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into ``model`` with ``strict=True``; ``source`` names it in errors.

        load_into(resnet18(), load_checkpoint("resnet18.pth"), source="resnet18.pth")
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatches, checkpoint vs model ({_listed(mismatched)})"
        )
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into float32
        raise WeightsError(f"{source} does not fit {type(model).__name__}: {exc}") from exc
