"""Dependencies run one way: product <- tests, product <- bench; tests and bench never import
each other (``tests/bench/`` alone may import ``bench``), and the device side never imports the
web framework or the service."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Top-level package of every absolute import in ``path`` (in functions too), with its line."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _offenders(folder: str, banned: set[str], *, skip: str | None = None) -> list[str]:
    root = REPO / folder
    return [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted(root.rglob("*.py"))
        if skip is None or not path.is_relative_to(REPO / skip)
        for line, name in _imports(path)
        if name in banned
    ]


@pytest.mark.parametrize(
    ("folder", "banned", "skip"),
    [
        ("tests", {"bench"}, "tests/bench"),
        ("bench", {"tests"}, None),
        ("shared", {"fastapi", "uvicorn", "cloud_server", "device_client", "bench", "tests"}, None),
        ("device_client", {"fastapi", "uvicorn", "cloud_server", "bench", "tests"}, None),
        ("cloud_server", {"device_client", "bench", "tests"}, None),
    ],
    ids=["tests", "bench", "shared", "device_client", "cloud_server"],
)
def test_dependencies_run_one_way(folder: str, banned: set[str], skip: str | None) -> None:
    assert not _offenders(folder, banned, skip=skip)


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bench.report import write_json\nimport bench.netem\n")
    assert sorted(_imports(module)) == [(2, "bench"), (3, "bench")]
