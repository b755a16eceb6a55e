"""``python -m cloud_server --host H --port P``: the command the container and the tests run."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from cloud_server.app import create_app
from cloud_server.backend import BACKENDS
from cloud_server.server import serve
from cloud_server.settings import Settings
from shared import cliargs
from shared.errors import SplitServeError
from shared.models import get_spec


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = cliargs.OneLineParser(
        prog="python -m cloud_server", tool="cloud_server",
        description="Serve the tails of split models. Every flag also reads SPLITSERVE_<NAME>.")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    # Bounds are the Settings' own, so that flags and SPLITSERVE_* are checked alike.
    p.add_argument("--port", type=int, help="bind port (default 8000)")
    p.add_argument("--models", help="comma-separated: name or name=/path/to/checkpoint.pth")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--threads", type=int,
                   help="intra-op threads of the backend (default: follow the CPU limit)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="what runs tails and the whole model (default onnxruntime)")
    p.add_argument("--bundle-dir", help="the ONNX bundle cache (default ~/.cache/splitserve/"
                   "bundles)")
    p.add_argument("--bundle-int8", action="store_const", const=True,
                   help="add int8 heads and whole model to the bundle devices download")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="private key of --ssl-certfile (PEM)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> Settings:
    """Environment first, flags override. Raises SplitServeError with a one-line reason."""
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        raise SplitServeError(f"invalid setting {field}: {err['msg']}") from exc
    for name, weights in settings.model_weights().items():
        get_spec(name)  # UnknownModelError names the valid ones
        if weights is not None and not Path(weights).is_file():
            raise SplitServeError(f"weights file for {name} not found: {weights}")
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise SplitServeError("--ssl-certfile and --ssl-keyfile go together")
    return settings


def exposed_without_keys(settings: Settings) -> bool:
    """True when the service listens beyond loopback (not 127.0.0.0/8, ::1 or localhost) and
    takes no API key: anyone who can reach the port can use it."""
    if settings.api_keys:
        return False
    host = settings.host.strip("[]")
    if host.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it may resolve to any interface


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(_parse(argv))
    except SplitServeError as exc:
        print(f"cloud_server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("cloud_server")
    log.debug("settings: %r", settings)  # API keys are SecretStr: they print as '**********'
    if exposed_without_keys(settings):
        log.warning(
            "listening on %s with no API key: anyone who can reach port %d can use this service;"
            " set SPLITSERVE_API_KEYS, or bind 127.0.0.1", settings.host, settings.port)
    serve(create_app(settings, freeze_heap=True), settings)  # this process is the app's
    return 0


if __name__ == "__main__":
    sys.exit(main())
