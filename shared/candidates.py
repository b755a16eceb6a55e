"""The names of the candidates an inference can run as, defined once for every package.

    device   the whole model on the device, nothing sent
    cloud    the image sent, the whole model in the service: also the service's key for its
             whole model, in the profile it publishes, in its answers and in its metrics
    auto     not a candidate: the planner picks one per image

Any other name is a split point's (``shared.partition``); none may take these.
"""

from __future__ import annotations

from typing import Final

__all__ = ["AUTO", "CLOUD", "DEVICE", "RESERVED", "WHOLE_MODEL"]

DEVICE: Final = "device"
CLOUD: Final = "cloud"
AUTO: Final = "auto"
WHOLE_MODEL: Final = CLOUD  # the service's key for the whole model: what the `cloud` candidate runs
RESERVED = (DEVICE, CLOUD, AUTO)  # never the name of a split point
