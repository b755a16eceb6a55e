"""``python -m bench SUBCOMMAND ...``: the benchmark command line.

    python -m bench fidelity --quick --out /tmp/fid
    python -m bench latency --quick --out /tmp/lat

To add a subcommand, write ``bench/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int`` (and a module docstring: its first line is the ``--help`` summary), then
add it to ``SUBCOMMANDS``.

The benchmarks live in the source tree, not in the installed package: run them from the
repository root, or from anywhere with ``PYTHONPATH=/path/to/splitserve``. Either way the default
``--out bench/results`` is the repository's ``bench/results``, never one under the current folder.

Every failure is one line on stderr, never a traceback (``SPLITSERVE_DEBUG=1`` shows one).
Exit codes: 0 ok, 1 an error, 2 a usage error (bad option or setting), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from bench import (
    board,
    fidelity,
    fleet,
    gc_pause,
    install_size,
    latency,
    reliability,
    runtime,
    serve_overhead,
    service,
)
from shared import cliargs
from shared.errors import ConfigError, SplitServeError

__all__ = ["SUBCOMMANDS", "main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("bench/results")  # every subcommand's default --out, relative to REPO

SUBCOMMANDS: dict[str, ModuleType] = {
    "board": board,
    "fidelity": fidelity,
    "fleet": fleet,
    "gc-pause": gc_pause,
    "install-size": install_size,
    "latency": latency,
    "reliability": reliability,
    "runtime": runtime,
    "service": service,
    "serve-overhead": serve_overhead,
}


def _parser() -> argparse.ArgumentParser:
    p = cliargs.OneLineParser(
        prog="python -m bench",
        tool="bench",
        description="splitserve benchmarks; results go to JSON, markdown and PNG files.",
    )
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, module in SUBCOMMANDS.items():
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sp = sub.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "out", None) == DEFAULT_OUT and Path.cwd().resolve() != REPO:
        args.out = REPO / DEFAULT_OUT
    try:
        result: int = SUBCOMMANDS[args.subcommand].run(args)
        return result
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        return _fail(exc, code=2)
    except (SplitServeError, OSError) as exc:
        return _fail(exc)
    except Exception as exc:  # the promise: no tracebacks on the command line
        if os.environ.get("SPLITSERVE_DEBUG"):
            raise
        return _fail(exc, prefix="internal error: ")


def _fail(exc: BaseException, *, code: int = 1, prefix: str = "") -> int:
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    print(f"bench: error: {prefix}{message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
