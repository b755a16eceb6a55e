"""The torch side of ONNX bundles: export a model's whole graph, heads and tails, check them.

    from shared.export import export_bundle
    export_bundle("efficientnet_lite0", "bundles/lite0", int8=True)

Reading a bundle needs none of this (no torch): see ``shared.bundle``.
"""

from shared.export.writer import calibration_images, export_bundle

__all__ = ["calibration_images", "export_bundle"]
