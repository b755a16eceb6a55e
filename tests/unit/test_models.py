"""The model registry, the three architectures, checkpoint loading and fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import fx, nn

from shared.errors import (
    ConfigError,
    DuplicateModelError,
    UnknownModelError,
    WeightsError,
)
from shared.models import (
    ModelSpec,
    fingerprint,
    get_model,
    get_spec,
    imagenet_labels,
    list_models,
    register_model,
)
from shared.models import registry as registry_module
from shared.preprocess import IMAGENET_PREPROCESSING, Preprocessing, preprocess

MODELS = ["efficientnet_lite0", "mobilenet_v2", "resnet18"]
REPO_ROOT = Path(__file__).resolve().parents[2]

_BUILT: dict[str, nn.Module] = {}


def built(name: str) -> nn.Module:
    """Each model once per test session, with its default weights: building is the slow part."""
    if name not in _BUILT:
        _BUILT[name] = get_model(name)
    return _BUILT[name]


# --- registry -------------------------------------------------------------------------------


def test_list_models_has_the_builtins_sorted() -> None:
    assert list_models() == MODELS


@pytest.mark.parametrize("lookup", [get_spec, get_model], ids=["get_spec", "get_model"])
def test_unknown_name_raises_and_lists_known_names(lookup: Callable[[str], object]) -> None:
    with pytest.raises(UnknownModelError, match="resnet18") as info:
        lookup("nope")
    assert isinstance(info.value, LookupError)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(DuplicateModelError, match="resnet18"):
        register_model(get_spec("resnet18"))


def test_register_then_build_a_new_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    tiny = ModelSpec(
        "tiny",
        builder=lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)),
        preprocessing=Preprocessing(resize_size=8, crop_size=8),
        num_classes=10,
    )
    assert register_model(tiny) is tiny
    assert get_spec("tiny") is tiny
    assert "tiny" in list_models()
    assert get_model("tiny")(tiny.example_input()).shape == (1, 10)
    with pytest.raises(DuplicateModelError):
        register_model(tiny)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "Bad Name"},
        {"name": ""},
        {"num_classes": 0},
        {"default_weights": "pretrained"},
        {"default_weights": "imagenet"},  # but no shipped weights
    ],
    ids=["spaces", "empty", "no-classes", "unknown-default", "imagenet-without-file"],
)
def test_model_spec_validates(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "name": "ok",
        "builder": nn.Identity,
        "preprocessing": IMAGENET_PREPROCESSING,
    }
    with pytest.raises(ConfigError):
        ModelSpec(**(fields | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODELS)
def test_spec_input_shape_and_example_input(name: str) -> None:
    spec = get_spec(name)
    assert spec.input_shape == (1, 3, 224, 224)
    example = spec.example_input()
    assert example.shape == spec.input_shape and example.dtype == torch.float32
    assert not example.any()


def test_default_weights() -> None:
    assert get_spec("efficientnet_lite0").default_weights == "imagenet"
    assert get_spec("resnet18").default_weights == "random"
    assert get_spec("mobilenet_v2").default_weights == "random"


def test_imagenet_weights_for_a_model_without_them_raise() -> None:
    with pytest.raises(WeightsError, match="ships no ImageNet weights"):
        get_model("resnet18", weights="imagenet")


def test_bad_seed_raises() -> None:
    with pytest.raises(ConfigError):
        get_model("resnet18", seed="0")  # type: ignore[arg-type]


# --- architectures --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_model_is_frozen_in_eval_mode(name: str) -> None:
    model = built(name)
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_logits_shape_and_fx_trace_agree(name: str) -> None:
    model = built(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        logits = model(x)
        traced_logits = traced(x)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    # Random weights too must give a usable signal, not all-equal or vanishing logits.
    assert logits.std() > 1e-3
    assert not torch.allclose(logits[0], logits[1])
    torch.testing.assert_close(traced_logits, logits, rtol=0, atol=0)
    # The traced module has the same parameters under the same names.
    assert fingerprint(traced) == fingerprint(model)


def _bn(prefix: str) -> list[str]:
    suffixes = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    return [f"{prefix}.{s}" for s in suffixes]


def _torchvision_resnet18_keys() -> list[str]:
    keys = ["conv1.weight", *_bn("bn1")]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def _torchvision_mobilenet_v2_keys() -> list[str]:
    keys = ["features.0.0.weight", *_bn("features.0.1")]
    keys += ["features.1.conv.0.0.weight", *_bn("features.1.conv.0.1")]
    keys += ["features.1.conv.1.weight", *_bn("features.1.conv.2")]
    for i in range(2, 18):
        p = f"features.{i}.conv"
        keys += [f"{p}.0.0.weight", *_bn(f"{p}.0.1"), f"{p}.1.0.weight", *_bn(f"{p}.1.1")]
        keys += [f"{p}.2.weight", *_bn(f"{p}.3")]
    keys += ["features.18.0.weight", *_bn("features.18.1")]
    return keys + ["classifier.1.weight", "classifier.1.bias"]


@pytest.mark.parametrize(
    ("name", "expected_keys", "count", "shapes"),
    [
        (
            "resnet18",
            _torchvision_resnet18_keys(),
            122,
            {
                "conv1.weight": (64, 3, 7, 7),
                "layer1.0.conv1.weight": (64, 64, 3, 3),
                "layer3.0.downsample.0.weight": (256, 128, 1, 1),
                "layer4.1.bn2.running_var": (512,),
                "fc.weight": (1000, 512),
            },
        ),
        (
            "mobilenet_v2",
            _torchvision_mobilenet_v2_keys(),
            314,
            {
                "features.0.0.weight": (32, 3, 3, 3),
                "features.1.conv.0.0.weight": (32, 1, 3, 3),
                "features.1.conv.1.weight": (16, 32, 1, 1),
                "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.17.conv.2.weight": (320, 960, 1, 1),
                "features.18.0.weight": (1280, 320, 1, 1),
                "classifier.1.weight": (1000, 1280),
            },
        ),
    ],
    ids=["resnet18", "mobilenet_v2"],
)
def test_state_dict_keys_are_torchvisions(
    name: str, expected_keys: list[str], count: int, shapes: dict[str, tuple[int, ...]]
) -> None:
    state = built(name).state_dict()
    assert len(expected_keys) == count
    assert list(state) == expected_keys
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_efficientnet_matches_the_shipped_checkpoint_exactly() -> None:
    shipped = get_spec("efficientnet_lite0").shipped_weights
    assert shipped is not None
    state = torch.load(shipped(), map_location="cpu", weights_only=True)
    model = built("efficientnet_lite0")
    assert len(state) == 296
    assert list(model.state_dict()) == list(state)
    assert fingerprint(model) == fingerprint(state)
    block0 = model.get_submodule("_blocks.0")
    assert getattr(block0, "_expand_conv", None) is None  # expand ratio 1
    assert isinstance(model.get_submodule("_blocks.1._relu1"), nn.ReLU6)


# --- weights --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A seed other than the default, so a load that silently kept random init would show."""
    return get_model("resnet18", weights="random", seed=7).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "lr": 0.1},
    ],
    ids=["plain", "data-parallel", "state_dict-wrapper", "model-wrapper"],
)
def test_checkpoint_file_loads(
    tmp_path: Path, resnet_state: dict[str, torch.Tensor], wrap: Callable[[dict], object]
) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(resnet_state), path)
    model = get_model("resnet18", weights=path)
    assert fingerprint(model) == fingerprint(resnet_state)
    assert fingerprint(get_model("resnet18", weights=str(path))) == fingerprint(resnet_state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_state_dict_mapping_loads_as_a_copy() -> None:
    state = get_model("mobilenet_v2", seed=5).state_dict()
    model = get_model("mobilenet_v2", weights=state)
    assert fingerprint(model) == fingerprint(state)
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}}
    assert fingerprint(get_model("mobilenet_v2", weights=wrapped)) == fingerprint(state)
    state["classifier.1.bias"].add_(1.0)
    assert fingerprint(model) != fingerprint(state)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "fc.bias"}, "missing keys .*fc.bias"),
        (lambda sd: sd | {"fc.extra": torch.zeros(1)}, "unexpected keys .*fc.extra"),
        (lambda sd: sd | {"fc.weight": torch.zeros(10, 512)}, r"fc.weight \(10, 512\)"),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_checkpoint_that_does_not_fit_raises(
    tmp_path: Path,
    resnet_state: dict[str, torch.Tensor],
    corrupt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    message: str,
) -> None:
    with pytest.raises(WeightsError, match=message):
        get_model("resnet18", weights=corrupt(dict(resnet_state)))
    path = tmp_path / "bad.pth"
    torch.save(corrupt(dict(resnet_state)), path)
    with pytest.raises(WeightsError, match=message):
        get_model("resnet18", weights=path)


class Payload:
    """Not a tensor: weights_only=True must refuse to rebuild it."""

    def __reduce__(self) -> tuple[object, ...]:
        return (os.getcwd, ())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (os.system, "refused: it refers to .*system"),
        (Payload(), "refused: it refers to .*getcwd"),
        ({"fc.weight": Path("x")}, "refused: it refers to pathlib"),
        ([torch.zeros(1)], "not a state dict"),
        ({"fc.weight": "not a tensor"}, "not a state dict"),
        ({}, "empty"),
    ],
    ids=["function-reference", "reduce-payload", "custom-class", "list", "str-value", "empty"],
)
def test_checkpoint_with_other_objects_is_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "evil.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=message):
        get_model("resnet18", weights=path)


@pytest.mark.parametrize(
    "data", [None, b"", b"not a zip file at all"], ids=["missing", "empty", "garbage"]
)
def test_unreadable_checkpoint_raises(tmp_path: Path, data: bytes | None) -> None:
    path = tmp_path / "ckpt.pth"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(WeightsError):
        get_model("resnet18", weights=path)


def test_weights_of_a_wrong_type_raise() -> None:
    with pytest.raises(ConfigError):
        get_model("resnet18", weights=3)  # type: ignore[arg-type]


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_ignores_the_global_rng() -> None:
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    first = get_model("resnet18", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    torch.rand(1000)
    second = get_model("resnet18", seed=0)
    assert fingerprint(first) == fingerprint(second) == fingerprint(built("resnet18"))
    assert len(fingerprint(first)) == 32
    assert int(fingerprint(first), 16) >= 0


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from shared.models import fingerprint, get_model\n"
        "print(fingerprint(get_model('mobilenet_v2', seed=2)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.strip() == fingerprint(get_model("mobilenet_v2", seed=2))


def test_fingerprint_changes_with_seed_and_with_any_value() -> None:
    base = built("resnet18").state_dict()
    assert fingerprint(get_model("resnet18", seed=1)) != fingerprint(base)
    perturbed = {k: v.clone() for k, v in base.items()}
    weight = perturbed["layer2.1.conv1.weight"].view(-1)
    weight[17] = torch.nextafter(weight[17], torch.tensor(float("inf")))
    assert fingerprint(perturbed) != fingerprint(base)
    renamed = {("x" + k if k == "fc.bias" else k): v for k, v in base.items()}
    assert fingerprint(renamed) != fingerprint(base)
    retyped = base | {"fc.bias": base["fc.bias"].double()}
    assert fingerprint(retyped) != fingerprint(base)


# --- labels and the real weights --------------------------------------------------------------


def test_imagenet_labels() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[967] == "espresso"
    assert imagenet_labels() is labels


def _top5(photo: str) -> list[int]:
    skimage_data = pytest.importorskip("skimage.data")
    pixels = getattr(skimage_data, photo)()
    img = Image.fromarray(pixels).convert("RGB")
    x = preprocess(img, get_spec("efficientnet_lite0").preprocessing)
    with torch.no_grad():
        logits = built("efficientnet_lite0")(x)
    return [int(i) for i in logits[0].topk(5).indices]


@pytest.mark.parametrize(
    ("photo", "top1", "in_top5"),
    [
        ("chelsea", {281, 282, 285}, set()),  # tabby, tiger cat, Egyptian cat
        ("coffee", None, {967, 968, 504}),  # espresso, cup, coffee mug
        ("rocket", None, {657, 744, 812}),  # missile, projectile, space shuttle
    ],
    ids=["chelsea", "coffee", "rocket"],
)
def test_efficientnet_lite0_recognizes_photos(
    photo: str, top1: set[int] | None, in_top5: set[int]
) -> None:
    top5 = _top5(photo)
    if top1 is not None:
        assert top5[0] in top1, [imagenet_labels()[i] for i in top5]
    assert not in_top5 or in_top5 & set(top5), [imagenet_labels()[i] for i in top5]
