"""Command-line value types and one-line usage errors (shared/cliargs.py)."""

from __future__ import annotations

import argparse

import pytest

from shared import cliargs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be 1..22, got 0"),
        ("23", "must be 1..22, got 23"),
        ("3.5", "expected an integer"),
    ],
)
def test_integer_refuses_out_of_range_and_non_integers(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        cliargs.integer(at_least=1, at_most=22)(text)


def test_integer_accepts_bounds_and_open_ends() -> None:
    assert cliargs.integer(at_least=1, at_most=22)("22") == 22
    assert cliargs.integer(at_least=0)("1000000") == 1_000_000
    assert cliargs.integer()("-5") == -5


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "fast"])
def test_real_refuses_non_finite_and_non_numbers(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a"):
        cliargs.real(at_least=0)(text)


def test_real_bounds() -> None:
    positive = cliargs.real(above=0)
    assert positive("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0, got 0"):
        positive("0")
    share = cliargs.real(at_least=0, at_most=0.5)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 0\.\.0\.5, got 0\.75"):
        share("0.75")


def test_usage_errors_are_one_line_including_subcommands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = cliargs.OneLineParser(prog="python -m tool", tool="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--level", type=cliargs.integer(at_least=1, at_most=22))
    for argv in (["run", "--level", "99"], ["run", "--nope"], []):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tool: error: "), err
    assert parser.parse_args(["run", "--level", "3"]).level == 3


def test_integers_take_a_comma_list_with_a_bound() -> None:
    parse = cliargs.integers(at_least=1)
    assert parse("1, 8,32,") == [1, 8, 32]
    for bad in ("", ",", "1,x", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
