"""How big the torch-free device install is: a fresh virtualenv, a plain ``pip install .``.

    python -m bench install-size                          # python3 -m venv, pip install .
    python -m bench install-size --python python3.12 --out /tmp/size
    python -m bench install-size --without-pip      # the interpreter's pip installs into the venv

Makes a virtualenv with ``--python`` in a temporary directory, notes what the venv itself
brought (pip, and setuptools on Python < 3.12), runs ``pip install REPO`` in it, checks that
``import torch`` fails there, and reports the site-packages total as ``du -sm`` counts it (disk
blocks, MiB), split into ours (splitserve and what it pulls in) and the venv's own, the compiled
``.pyc`` share, and the largest packages. Writes ``install_size.json`` and ``install_size.md``.
Needs the package index pip is configured with (or its cache); nothing else.

``install_sizes`` (bytes per installed distribution, from its RECORD) is also what
``python -m bench runtime`` reports for the environment it runs in.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from shared.errors import ConfigError

__all__ = ["BAR_MB", "add_arguments", "du_bytes", "install_sizes", "measure", "run",
           "site_packages"]

BAR_MB = 250  # issue 10: the device install's site-packages
REPO = Path(__file__).resolve().parents[1]
_MB = 2**20  # du -m counts MiB


def du_bytes(paths: Iterable[Path]) -> int:
    """Disk usage of ``paths`` (files, or trees) as ``du`` counts it: allocated blocks, each
    inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(p: Path) -> None:
        nonlocal total
        try:
            st = p.lstat()
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512

    for path in paths:
        add(path)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    add(Path(root) / name)
    return total


def install_sizes(names: Sequence[str] | None = None, *, path: Path | None = None,
                  blocks: bool = False) -> dict[str, int | None]:
    """Installed bytes of each distribution (its RECORD's files), None when not installed.

    ``path``: a site-packages directory to look in instead of this interpreter's; ``names``:
    None for every distribution there. ``blocks``: disk usage (as ``du``) instead of file sizes.
    """
    dists = (metadata.distributions(path=[str(path)]) if path is not None
             else metadata.distributions())
    found = {d.metadata["Name"].lower(): d for d in dists}
    out: dict[str, int | None] = {}
    for name in names if names is not None else sorted(found):
        dist = found.get(name.lower())
        if dist is None:
            out[name] = None
            continue
        files = [Path(str(dist.locate_file(f))) for f in dist.files or []]
        if blocks:
            out[name] = du_bytes(files)
            continue
        size = 0
        for f in files:
            try:
                size += f.stat().st_size
            except OSError:
                pass
        out[name] = size
    return out


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3*/site-packages")
    return found


def _run(args: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"{what} failed: {tail[0]}")
    return done


def measure(python: str, venv: Path, repo: Path = REPO, *, without_pip: bool = False,
            top: int = 12) -> dict[str, Any]:
    """Build a venv at ``venv`` with ``python``, install ``repo`` into it, measure.

    ``without_pip``: the venv gets no pip (nor setuptools) of its own; ``python``'s pip installs
    into it (``pip --python``, pip >= 22.3), as a board image built from outside would be."""
    _run([python, "-m", "venv", *(["--without-pip"] if without_pip else []), str(venv)],
         f"{python} -m venv")
    vpy = str(venv / "bin" / "python")
    pip = ([python, "-m", "pip", "--python", vpy] if without_pip else [vpy, "-m", "pip"])
    version = _run([vpy, "-c", "import sys; print(sys.version.split()[0])"], "python").stdout
    site = site_packages(venv)
    own = sorted(install_sizes(path=site))  # what the venv brings before we install anything
    started = time.perf_counter()
    _run([*pip, "install", "--disable-pip-version-check", str(repo)], "pip install .")
    install_s = time.perf_counter() - started
    torch = subprocess.run([vpy, "-c", "import torch"], capture_output=True, text=True)
    sizes = {k: v or 0 for k, v in install_sizes(path=site, blocks=True).items()}
    total = du_bytes([site])
    pyc = du_bytes(p for p in site.rglob("__pycache__"))
    venv_own = sum(sizes.get(n, 0) for n in own)
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    return {
        "python": python,
        "python_version": version.strip(),
        "command": (f"{python} -m venv --without-pip v && {python} -m pip --python v/bin/python "
                    "install . && du -sm v/lib/python3*/site-packages" if without_pip else
                    f"{python} -m venv v && v/bin/pip install . && du -sm "
                    "v/lib/python3*/site-packages"),
        "without_pip": without_pip,
        "import_torch_fails": torch.returncode != 0,
        "install_s": round(install_s, 1),
        "site_packages_mb": round(total / _MB, 1),
        "venv_own": {n: round(sizes.get(n, 0) / _MB, 1) for n in own},
        "venv_own_mb": round(venv_own / _MB, 1),
        "ours_mb": round((total - venv_own) / _MB, 1),
        "pyc_mb": round(pyc / _MB, 1),
        "top": [{"name": n, "mb": round(b / _MB, 1), "venv_own": n in own}
                for n, b in ranked[:top]],
        "distributions": len(sizes),
        "bar_mb": BAR_MB,
        "under_bar": total / _MB < BAR_MB,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", default="python3",
                   help="the interpreter that makes the venv (default python3)")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="output directory (default bench/results)")
    p.add_argument("--without-pip", action="store_true",
                   help="a venv without its own pip and setuptools; --python's pip installs "
                        "into it")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="build the venv here and keep it (default: a temporary directory)")


def _markdown(r: dict[str, Any]) -> str:
    rows = [[t["name"] + (" (venv's own)" if t["venv_own"] else ""), f"{t['mb']:.1f}"]
            for t in r["top"]]
    return "\n".join([
        "# Device install size\n",
        f"Python {r['python_version']} (`{r['python']}`), a fresh venv"
        f"{' without pip of its own' if r.get('without_pip') else ''}, `pip install .`: "
        f"site-packages **{r['site_packages_mb']:.0f} MB** (`du -sm`; bar < {r['bar_mb']} MB: "
        f"{'met' if r['under_bar'] else 'MISSED'}); ours {r['ours_mb']:.0f} MB, the venv's own "
        f"{r['venv_own_mb']:.0f} MB ({', '.join(r['venv_own']) or 'nothing'}); compiled .pyc "
        f"{r['pyc_mb']:.0f} MB of the total. `import torch` "
        f"{'fails' if r['import_torch_fails'] else 'WORKS (torch got installed)'}.\n",
        f"`{r['command']}`\n",
        report.markdown_table(["distribution", "MB"], rows, align="lr"),
    ]) + "\n"


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    console = report.make_console()
    with tempfile.TemporaryDirectory(prefix="splitserve-size-") as tmp:
        venv = args.keep if args.keep is not None else Path(tmp) / "v"
        with console.status(f"{args.python} -m venv, pip install {REPO}"):
            result = measure(args.python, venv, without_pip=args.without_pip)
    report.write_json(args.out / "install_size.json", result)
    report.write_text(args.out / "install_size.md", _markdown(result))
    console.print(_markdown(result))
    if not result["import_torch_fails"]:
        print("bench: error: torch is importable in the device venv", file=sys.stderr)
        return 1
    return 0
