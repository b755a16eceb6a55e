"""Do two ``device_client profile --json`` outputs agree? The bar of issue 10's item 5.

    python -m bench.profile_agree quiet.json busy.json [--tolerance 0.2]

Prints, per split point, both head costs and their ratio; then whether each profile is monotone
(no head cheaper than an earlier one, none dearer than ``device``) and whether every head (and
``device``) agrees within the tolerance. Exits 0 only if both hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

_FIXED = ("device", "cloud")


def heads(doc: dict[str, Any]) -> list[tuple[str, float]]:
    return [(c["split"], float(c["head_ms"])) for c in doc["costs"] if c["split"] not in _FIXED]


def whole_ms(doc: dict[str, Any]) -> float:
    return next(float(c["head_ms"]) for c in doc["costs"] if c["split"] == "device")


def monotone(doc: dict[str, Any]) -> bool:
    values = [ms for _, ms in heads(doc)]
    return (all(a <= b for a, b in zip(values, values[1:], strict=False))
            and all(ms <= whole_ms(doc) for ms in values))


def disagreement(a: float, b: float) -> float:
    """How far apart two figures are, relative to the smaller one: 0.2 is 20 %."""
    low = min(a, b)
    return abs(a - b) / low if low > 0 else (0.0 if a == b else float("inf"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_agree", description=__doc__)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, default=0.2)
    args = parser.parse_args(argv)
    with open(args.first) as f1, open(args.second) as f2:
        one, two = json.load(f1), json.load(f2)
    rows = [("device", whole_ms(one), whole_ms(two))]
    rows += [(name, a, b) for (name, a), (_, b) in zip(heads(one), heads(two), strict=True)]
    worst = 0.0
    print(f"{'candidate':<14} {'first ms':>9} {'second ms':>9} {'apart':>7}")
    for name, a, b in rows:
        apart = disagreement(a, b)
        worst = max(worst, apart)
        flag = "" if apart <= args.tolerance else "  <-"
        print(f"{name:<14} {a:9.2f} {b:9.2f} {apart:7.1%}{flag}")
    ok_mono = monotone(one) and monotone(two)
    ok_agree = worst <= args.tolerance
    print(f"monotone: first {monotone(one)}, second {monotone(two)}; "
          f"worst disagreement {worst:.1%} (tolerance {args.tolerance:.0%}): "
          f"{'agree' if ok_agree else 'DISAGREE'}")
    return 0 if ok_mono and ok_agree else 1


if __name__ == "__main__":
    sys.exit(main())
