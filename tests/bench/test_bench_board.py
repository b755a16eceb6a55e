"""``bench board``'s pure part (commands, ``infer --json`` parsing, the report) and its CLI's
refusals, without an arm64 root; one test uses the cached root when this machine has one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench import board, board_root
from bench.board_report import (
    EMULATION_NOTE,
    BoardRun,
    HostFacts,
    InferAnswer,
    agreement,
    board_markdown,
    build_report,
    chroot_argv,
    debootstrap_argv,
    host_problems,
    infer_argv,
    join_runs,
    parse_infer_json,
    photo_filename,
    pip_env,
)
from device_client.results import InferenceResult, Timings
from shared.errors import ConfigError
from shared.predictions import Prediction

READY = HostFacts(is_root=True, debootstrap=True,
                  qemu_version="qemu-aarch64 version 10.0.2 (Debian 1:10.0.2+ds-2)",
                  binfmt_mounted=True,
                  binfmt_entry="enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
                               "flags: POF\noffset 0\n")


def _line(path: str, index: int, label: str, *, ran: str = "device", split: str = "device",
          fallback: str | None = None) -> str:
    # The real --json object, built by the class infer prints.
    result = InferenceResult(image=path, split=split, ran=ran,  # type: ignore[arg-type]
                             top5=(Prediction(index, label, 0.9), Prediction(1, "goldfish", 0.05)),
                             bytes_sent=0, timings=Timings(head=800.0, total=812.5),
                             fallback=fallback)
    return json.dumps(result.to_json())


def _answers(folder: str, labels: dict[str, int], **kw: str) -> list[InferAnswer]:
    text = "\n".join(_line(f"{folder}/{photo_filename(p)}", i, f"class{i}", **kw)
                     for p, i in labels.items())
    return parse_infer_json(text + "\n\n")


def test_infer_json_lines_parse_into_answers() -> None:
    (a,) = parse_infer_json(_line("/tmp/p/chelsea.png", 285, "Egyptian cat"))
    assert (a.image, a.top1_index, a.top1_label, a.ran, a.fallback) == (
        "/tmp/p/chelsea.png", 285, "Egyptian cat", "device", None)
    assert (a.total_ms, a.top1_prob) == (812.5, 0.9)


@pytest.mark.parametrize("text", ["not json", '{"image": "x"}', '{"image": "x", "top5": []}'],
                         ids=["garbage", "no-top5", "empty-top5"])
def test_a_line_that_is_not_an_answer_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="infer --json line 1"):
        parse_infer_json(text)


def test_runs_pair_board_and_reference_answers_by_photo() -> None:
    photos = ["chelsea", "chelsea/crop000", "coffee"]
    board_ans = _answers("/tmp/splitserve-board/photos",
                         {"chelsea": 285, "chelsea/crop000": 281, "coffee": 967},
                         ran="split", split="_blocks.9")
    ref = _answers("/root/cache/board/arm64/tmp/splitserve-board/photos",
                   {"coffee": 967, "chelsea": 285, "chelsea/crop000": 285})
    runs = join_runs(photos, "_blocks.9", board_ans, ref)
    assert [r.photo for r in runs] == photos
    assert [r.agree for r in runs] == [True, False, True]
    assert agreement(runs) == (2, 3)
    assert runs[0].emulated_ms == 812.5


def test_a_missing_answer_or_a_fallback_is_an_error_not_a_run() -> None:
    ref = _answers("/h", {"chelsea": 285, "coffee": 967})
    with pytest.raises(ConfigError, match="no answer for coffee"):
        join_runs(["chelsea", "coffee"], "device", _answers("/b", {"chelsea": 285}), ref)
    fell_back = _answers("/b", {"chelsea": 285, "coffee": 967}, ran="device", split="_blocks.9",
                         fallback="service unavailable")
    with pytest.raises(ConfigError, match="ran on 'device', not 'split'"):
        join_runs(["chelsea", "coffee"], "_blocks.9", fell_back, ref)
    with pytest.raises(ConfigError, match="unknown photo"):
        join_runs(["chelsea"], "device", _answers("/b", {"rocket": 1}), ref)


def _runs() -> list[BoardRun]:
    return [BoardRun("chelsea", "device", "device", 285, "Egyptian cat", 285, "Egyptian cat",
                     0.61, 0.6, 900.0),
            BoardRun("coffee", "_blocks.9", "split", 504, "coffee mug", 967, "espresso",
                     0.5, 0.4, 700.0)]


def test_board_json_leads_with_machine_agree_total_and_runs() -> None:
    result = build_report(machine="aarch64", runs=_runs(), meta={"qemu_cpu": "cortex-a72"})
    assert list(result)[:4] == ["machine", "agree", "total", "runs"]
    assert (result["machine"], result["agree"], result["total"]) == ("aarch64", 1, 2)
    assert result["runs"][1] == {
        "photo": "coffee", "split": "_blocks.9", "ran": "split", "top1_index": 504,
        "top1_label": "coffee mug", "ref_index": 967, "ref_label": "espresso",
        "top1_prob": 0.5, "ref_prob": 0.4, "emulated_ms": 700.0, "agree": False}
    assert result["max_top1_prob_gap"] == 0.01  # over the runs that agree only
    assert result["times"] == EMULATION_NOTE
    json.dumps(result)  # writable as is


def test_the_table_says_times_are_emulated_and_shows_none() -> None:
    md = board_markdown(build_report(machine="aarch64", runs=_runs(),
                                     meta={"versions": {"onnxruntime": "1.23.2"}}))
    assert "1/2" in md and "onnxruntime 1.23.2" in md
    assert "not a board's times" in md
    table = md[md.index("| photo"):]
    assert "ms" not in table and "900" not in table
    assert ("| coffee | _blocks.9 | split | coffee mug (504) p=0.500 | espresso (967) p=0.400 "
            "| NO |") in table


def test_pip_in_the_root_gets_the_host_s_remote_index_and_ca_not_its_local_x86_wheels() -> None:
    env = {"PIP_FIND_LINKS": "/opt/wheels", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
           "PIP_DEFAULT_TIMEOUT": "180", "HOME": "/root",
           "PIP_EXTRA_INDEX_URL": "https://mirror.example/simple file:///opt/pypi/simple"}
    config = {"global.extra-index-url": "file:///opt/pypi/simple",
              "global.constraint": "/etc/xdg/pip/constraints.txt",
              "global.index-url": "https://index.example/simple"}
    out = pip_env(env, config, cert="/etc/ssl/certs/host.crt")
    assert out == {"PIP_INDEX_URL": "https://index.example/simple",
                   "PIP_EXTRA_INDEX_URL": "https://mirror.example/simple",
                   "PIP_DEFAULT_TIMEOUT": "180", "PIP_CERT": "/etc/ssl/certs/host.crt",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_commands_run_in_the_root_with_only_the_given_environment() -> None:
    argv = infer_argv("/opt/v/bin/python", server="http://127.0.0.1:5000", split="_blocks.9",
                      photos=["/p/a.png", "/p/b.png"])
    assert argv[:4] == ["/opt/v/bin/python", "-m", "device_client", "infer"]
    assert {"--json", "--no-fallback"} <= set(argv)
    assert argv[argv.index("--split") + 1] == "_blocks.9"
    assert argv[argv.index("--runtime") + 1] == "onnx"
    assert argv[-2:] == ["/p/a.png", "/p/b.png"]
    full = chroot_argv("/r", argv, {"QEMU_CPU": "cortex-a72", "HOME": "/root"})
    assert full[:6] == ["chroot", "/r", "/usr/bin/env", "-i", "QEMU_CPU=cortex-a72",
                        "HOME=/root"]
    boot = debootstrap_argv(arch="arm64", suite="bookworm", target="/c/arm64.partial",
                            mirror=None)
    assert boot == ["debootstrap", "--arch=arm64", "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates", "bookworm",
                    "/c/arm64.partial"]


def test_a_ready_host_has_no_problems() -> None:
    assert host_problems(READY) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"is_root": False}, "not root"),
    ({"debootstrap": False}, "debootstrap is not installed; fix: apt-get install -t "
                             "bookworm-backports"),
    ({"qemu_version": None}, "qemu-aarch64 is not installed"),
    ({"qemu_version": "qemu-aarch64 version 7.2.15 (Debian 1:7.2+dfsg-7)"}, "too old"),
    ({"binfmt_mounted": False}, "fix: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc"),
    ({"binfmt_entry": None}, "not registered with binfmt_misc"),
    ({"binfmt_entry": "enabled\ninterpreter /q\nflags: OC\n"}, "lacks the F (fix-binary) flag"),
    ({"binfmt_entry": "disabled\ninterpreter /q\nflags: POF\n"}, "entry is disabled"),
    ({"interpreter_exists": False}, "interpreter is missing"),
], ids=["user", "debootstrap", "no-qemu", "old-qemu", "unmounted", "unregistered", "no-F",
        "disabled", "no-interpreter"])
def test_each_missing_host_piece_is_one_line_with_its_fix(change: dict[str, object],
                                                          expected: str) -> None:
    (problem,) = host_problems(dataclasses.replace(READY, **change))  # type: ignore[arg-type]
    assert expected in problem and "\n" not in problem


def test_the_cli_refuses_a_host_without_qemu_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(board, "host_facts", lambda machine: dataclasses.replace(
        READY, qemu_version=None, binfmt_entry=None))
    code = cli.main(["board", "--arch", "arm64", "--out", str(tmp_path), "--root",
                     str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "qemu-aarch64 is not installed; fix: apt-get install" in err
    assert "(and 1 more)" in err and "bench/board_setup.sh" in err
    assert not (tmp_path / "root").exists() and not (tmp_path / "board.json").exists()


def test_a_half_built_root_is_rebuilt_and_a_foreign_one_refused(tmp_path: Path) -> None:
    root = board_root.BoardRoot(tmp_path / "arm64", arch="arm64", env={})
    partial = tmp_path / "arm64.partial"
    partial.mkdir()
    root.finish(partial, suite="bookworm")
    assert root.marker() == {"arch": "arm64", "suite": "bookworm"}
    assert root.ensure(suite="bookworm", mirror=None, log=print) is False  # reused, not built
    with pytest.raises(ConfigError, match="holds a arm64 bookworm root, not arm64 trixie"):
        root.ensure(suite="trixie", mirror=None, log=print)
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="not a finished board root"):
        board_root.BoardRoot(tmp_path / "other", arch="arm64", env={}).ensure(
            suite="bookworm", mirror=None, log=print)


def test_the_source_digest_changes_with_the_package_s_files(tmp_path: Path) -> None:
    for name in board_root.PACKAGE_FILES:
        if "." in name:
            (tmp_path / name).write_text(name)
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
    before = board_root.source_digest(tmp_path)
    (tmp_path / "shared" / "__pycache__").mkdir()
    (tmp_path / "shared" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert board_root.source_digest(tmp_path) == before  # bytecode is not source
    (tmp_path / "shared" / "codec.py").write_text("X = 1\n")
    assert board_root.source_digest(tmp_path) != before


def _cached_root() -> Path:
    root = board_root.default_root("arm64")
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot to enter the arm64 root")
    problems = host_problems(board_root.host_facts("aarch64"))
    if problems:
        pytest.skip(f"host not set up for arm64 roots: {problems[0]}")
    if board_root.BoardRoot(root, arch="arm64", env={}).marker() is None:
        pytest.skip(f"no cached arm64 root at {root} (python -m bench board --arch arm64 "
                    f"builds one)")
    return root


def test_the_cached_root_runs_as_aarch64() -> None:
    root = _cached_root()
    done = subprocess.run(chroot_argv(str(root), ["uname", "-m"], {"QEMU_CPU": "cortex-a72"}),
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "aarch64"
