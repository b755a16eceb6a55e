"""splitserve benchmarks, run from the repo root: ``python -m bench SUBCOMMAND ...``.

    python -m bench fidelity --quick          # quantization fidelity at every split point

Each subcommand is one module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
``bench.__main__.SUBCOMMANDS``. Shared output helpers (JSON, markdown, rich tables, PNG charts)
live in ``bench.report``; the evaluation images in ``bench.images``.
"""
