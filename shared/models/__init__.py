"""The models splitserve can split, by name, with their preprocessing and weights.

    >>> from shared.models import get_model, get_spec, imagenet_labels
    >>> from shared.preprocess import preprocess, reference_photo
    >>> spec = get_spec("efficientnet_lite0")
    >>> model = get_model(spec.name)                        # eval mode, ImageNet weights
    >>> logits = model(preprocess(reference_photo(), spec.preprocessing))
    >>> imagenet_labels()[int(logits.argmax())]
    'Egyptian cat'

Builders (``efficientnet_lite0``, ``mobilenet_v2``, ``resnet18``) return random-weight modules,
torchvision style; ``get_model`` is the way to get one with known weights.
"""

from shared.models.efficientnet_lite import efficientnet_lite0
from shared.models.mobilenetv2 import mobilenet_v2
from shared.models.registry import (
    ModelSpec,
    Weights,
    fingerprint,
    get_model,
    get_spec,
    imagenet_labels,
    list_models,
    register_model,
)
from shared.models.resnet import resnet18

__all__ = [
    "ModelSpec",
    "Weights",
    "efficientnet_lite0",
    "fingerprint",
    "get_model",
    "get_spec",
    "imagenet_labels",
    "list_models",
    "mobilenet_v2",
    "register_model",
    "resnet18",
]
