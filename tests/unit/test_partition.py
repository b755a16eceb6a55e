"""The partitioner on our three models and on test-only graphs: branches, concat, skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import PartitionError, UnknownSplitPointError
from shared.models import get_model
from shared.partition import Partitioner, SplitPoint, find_split_points, split_model


class TwoBranchConcat(nn.Module):
    """Inception-like: two branches from one stem, concatenated, then a skip over a block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        a = self.left(s)
        b = self.right(s)
        c = torch.cat([a, b], dim=1)
        y = self.mix(c) + s  # skip over the branches
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TwoOutputs(nn.Module):
    """Returns a tuple; a cut inside the shared trunk must carry it through."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3))
        self.cls = nn.Linear(6, 3)
        self.reg = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.flatten(F.adaptive_max_pool2d(self.trunk(x), 1), 1)
        return self.cls(f), self.reg(f)


class LongSkip(nn.Module):
    """A U-Net-like skip: early features are reused at the end, so middle cuts carry two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.mid1 = nn.Conv2d(4, 4, 3, padding=1)
        self.mid2 = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        m = self.mid2(torch.tanh(self.mid1(d)))
        return self.up(torch.cat([d, m], 1))


class WithBuffer(nn.Module):
    """A buffer read after the cut must be re-read in the tail, not sent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("offset", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.sigmoid(y) * self.offset + self.offset


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx can't trace it
            return x
        return -x


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module.eval()


TOY_MODELS = {
    "branch-concat": (TwoBranchConcat, (2, 3, 16, 16)),
    "two-outputs": (TwoOutputs, (2, 3, 12, 12)),
    "long-skip": (LongSkip, (2, 3, 8, 8)),
    "buffer": (WithBuffer, (2, 3, 4, 4)),
}


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)


@pytest.mark.parametrize("name", list(TOY_MODELS), ids=list(TOY_MODELS))
def test_every_cut_of_toy_models_reproduces_the_model(name: str) -> None:
    cls, shape = TOY_MODELS[name]
    model = _seeded(cls())
    x = torch.randn(*shape)
    part = Partitioner(model, x)
    assert part.points, "every toy model has at least one legal cut"
    with torch.inference_mode():
        expected = model(x)
        for point in part.points:
            head, tail = part.split(point)
            sent = head(x)
            assert isinstance(sent, tuple) and len(sent) == len(point.tensors)
            for t, spec in zip(sent, point.tensors, strict=True):
                assert tuple(t.shape[1:]) == spec.shape[1:] and t.shape[0] == shape[0]
            _assert_same(tail(*sent), expected)


def test_branching_graph_has_a_multi_tensor_cut() -> None:
    points = find_split_points(_seeded(TwoBranchConcat()), torch.randn(1, 3, 16, 16))
    widths = {p.name: len(p.tensors) for p in points}
    # After the left branch, the stem output (for the right branch and the skip) is live too.
    assert widths["left.1"] == 2
    # After both branches: both branch outputs and the stem output for the skip.
    assert widths["right.1"] == 3
    # After the concat, the concatenated tensor and the skip cross.
    assert widths["cat"] == 2
    assert max(widths.values()) <= 4


def test_long_skip_cut_carries_the_skip() -> None:
    points = find_split_points(_seeded(LongSkip()), torch.randn(1, 3, 8, 8))
    mid = next(p for p in points if p.name == "mid1")
    assert [s.shape for s in mid.tensors] == [(1, 4, 8, 8), (1, 4, 8, 8)]
    assert mid.float32_bytes == 2 * 4 * 4 * 8 * 8


def test_max_tensors_excludes_wide_cuts() -> None:
    narrow = find_split_points(_seeded(LongSkip()), torch.randn(1, 3, 8, 8), max_tensors=1)
    assert all(len(p.tensors) == 1 for p in narrow)
    assert "mid1" not in {p.name for p in narrow}


def test_buffers_are_not_sent() -> None:
    points = find_split_points(_seeded(WithBuffer()), torch.randn(1, 3, 4, 4))
    assert points and all(len(p.tensors) == 1 for p in points)


def test_points_are_in_execution_order_with_stable_names() -> None:
    model = _seeded(TwoBranchConcat())
    first = find_split_points(model, torch.randn(1, 3, 16, 16))
    again = find_split_points(_seeded(TwoBranchConcat()), torch.randn(3, 3, 16, 16))
    assert [p.index for p in first] == list(range(len(first)))
    assert first == again, "names, indices and per-sample shapes don't depend on batch or data"


def test_lookup_by_name_index_and_digits() -> None:
    part = Partitioner(_seeded(LongSkip()), torch.randn(1, 3, 8, 8))
    p = part.points[1]
    assert part.point(p.name) == p == part.point(1) == part.point("1")


@pytest.mark.parametrize("key", ["nope", 99, "-1", -1], ids=["name", "index", "neg-str", "neg"])
def test_unknown_split_point(key: str | int) -> None:
    part = Partitioner(_seeded(LongSkip()), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnknownSplitPointError, match="no split point"):
        part.split(key)


def test_foreign_split_point_is_refused() -> None:
    foreign = SplitPoint(
        "mid1", 1, find_split_points(_seeded(TwoOutputs()), torch.randn(1, 3, 12, 12))[0].tensors
    )
    with pytest.raises(UnknownSplitPointError):
        split_model(_seeded(LongSkip()), foreign, torch.randn(1, 3, 8, 8))


def test_untraceable_model_raises_partition_error() -> None:
    with pytest.raises(PartitionError, match="not torch.fx-traceable"):
        find_split_points(Untraceable(), torch.randn(1, 3))


def test_model_failing_on_example_input_raises_partition_error() -> None:
    with pytest.raises(PartitionError, match="example input"):
        find_split_points(_seeded(LongSkip()), torch.randn(1, 5, 8, 8))


def test_split_points_are_validated() -> None:
    with pytest.raises(ValueError):
        SplitPoint("", 0, ())


@pytest.mark.parametrize(
    "name",
    ["efficientnet_lite0", "mobilenet_v2", "resnet18"],
    ids=["efficientnet_lite0", "mobilenet_v2", "resnet18"],
)
def test_our_models_split_exactly_everywhere(name: str) -> None:
    model = get_model(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    part = Partitioner(model, x[:1])
    points = part.points
    assert len(points) >= 10
    assert all(len(p.tensors) == 1 for p in points), "block-level cuts carry one tensor"
    with torch.inference_mode():
        expected = model(x)
        for point in points:
            head, tail = part.split(point)
            torch.testing.assert_close(tail(*head(x)), expected, rtol=1e-4, atol=1e-4)


def test_resnet18_points_follow_torchvision_names() -> None:
    names = [p.name for p in find_split_points(get_model("resnet18"), torch.zeros(1, 3, 224, 224))]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer2.1" in names and "layer4.0" in names and names[-1] == "flatten"


def test_mobilenet_v2_points_are_its_features() -> None:
    names = [
        p.name for p in find_split_points(get_model("mobilenet_v2"), torch.zeros(1, 3, 224, 224))
    ]
    assert names[:3] == ["features.0", "features.1", "features.2"]
    assert "features.18" in names
