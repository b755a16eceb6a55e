"""Command-line parsing shared by ``device_client``, ``cloud_server`` and ``bench``.

A usage error is one line, ``TOOL: error: argument --x: must be >= 1, got 0 (see PROG --help)``,
and exit 2: argparse's default dumps the whole usage block first, which buries the one line that
matters. Value types check their bounds, so a bad flag is refused up front, never clamped and
never a traceback from deep inside. NaN and infinities are refused: they pass every
comparison-based bound check the wrong way.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and subparsers) whose usage errors are one line on stderr."""

    def __init__(self, *args: Any, tool: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool = tool

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(OneLineParser, tool=self.tool))
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.tool}: error: {message} (see {self.prog} --help)\n")


def integer(*, at_least: int | None = None, at_most: int | None = None) -> Callable[[str], int]:
    """An ``int`` in ``[at_least, at_most]`` (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        _check(value, text, at_least, at_most)
        return value

    return parse


def integers(*, at_least: int | None = None) -> Callable[[str], list[int]]:
    """Comma-separated ``int``s, at least one, each ``>= at_least`` (``"1,8,32"``)."""
    one = integer(at_least=at_least)

    def parse(text: str) -> list[int]:
        values = [one(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values

    return parse


def real(
    *, at_least: float | None = None, above: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    """A finite ``float`` with ``value >= at_least``, ``value > above`` and ``value <= at_most``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {_show(above)}, got {text}")
        _check(value, text, at_least, at_most)
        return value

    return parse


def service_url(text: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL: ``10.0.0.5:8000`` alone is refused up front, not
    read as "service down" and fallen back from at every image."""
    try:
        url = urlsplit(text.strip())
        url.port  # noqa: B018  (raises ValueError on a port that is not a number)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(
            f"expected http(s)://host[:port], got {text!r}")
    return text.strip()


def _check(value: float, text: str, at_least: float | None, at_most: float | None) -> None:
    if at_least is not None and at_most is not None and not at_least <= value <= at_most:
        raise argparse.ArgumentTypeError(f"must be {_show(at_least)}..{_show(at_most)}, got {text}")
    if at_least is not None and value < at_least:
        raise argparse.ArgumentTypeError(f"must be >= {_show(at_least)}, got {text}")
    if at_most is not None and value > at_most:
        raise argparse.ArgumentTypeError(f"must be <= {_show(at_most)}, got {text}")


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
