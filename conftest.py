"""Collection rules for the whole tree (``--doctest-modules`` walks the packages too)."""

from __future__ import annotations

import importlib.util

# cloud_server/serve.py imports ray, an optional extra (`pip install '.[ray]'`): without it the
# module's doctest cannot even be imported, so it is not collected.
collect_ignore = [] if importlib.util.find_spec("ray") else ["cloud_server/serve.py"]
