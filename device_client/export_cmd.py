"""``python -m device_client export``: write an ONNX bundle for a model and its weights.

    python -m device_client export --model efficientnet_lite0 --int8 --out bundles/lite0
    python -m device_client export --model resnet18 --weights ckpt.pth --out bundles/r18

Needs torch (the export side); the bundle it writes runs without it
(``device_client.onnx_runtime``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from shared.errors import ConfigError

__all__ = ["add_parser", "run", "shipped_photos"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
               default_model: str) -> None:
    p = sub.add_parser("export", help="write an ONNX bundle: whole model, every head and tail "
                                      "(checked against torch)")
    p.add_argument("--model", default=default_model, help=f"default {default_model}")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="checkpoint path (default: the model's own weights)")
    p.add_argument("--int8", action="store_true",
                   help="add statically quantized int8 heads and whole model")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="images to calibrate int8 on (default: the photos the package ships)")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle directory to write")


def run(args: argparse.Namespace) -> int:
    from shared.export import calibration_images, export_bundle

    if args.calibration is not None and not args.int8:
        raise ConfigError("--calibration only applies with --int8")
    images = (calibration_images(args.calibration) if args.calibration else shipped_photos()
              ) if args.int8 else None
    started = time.perf_counter()
    out = export_bundle(args.model, args.out, weights=args.weights, int8=args.int8,
                        calibration=images)
    size = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    print(f"wrote {out}: {args.model}, {'fp32 + int8' if args.int8 else 'fp32'}, "
          f"{size / 1e6:.1f} MB, checked against torch "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def shipped_photos() -> list[Image.Image]:
    """The default calibration set: scikit-image's sample photos (when installed) and the
    reference photo in the wheel."""
    from device_client.samples import sample_photos
    from shared.preprocess import reference_photo

    try:
        photos = list(sample_photos().values())
    except ConfigError:  # scikit-image is not installed: the one photo in the wheel
        photos = []
    return [*photos, reference_photo()]
