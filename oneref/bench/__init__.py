"""``oneref bench``: the paper's cost table, kernel tables and plots (see benchmarks/README.md).

Entry points: :func:`main` (``main(argv) -> exit code``), or :func:`add_arguments` on a
sub-parser plus :func:`run_bench` on the parsed namespace. Imports are lazy so that
``import oneref.bench`` stays cheap.
"""

from __future__ import annotations

__all__ = ["main", "run_bench", "add_arguments"]


def main(argv=None) -> int:
    from oneref.bench.main import main as _main
    return _main(argv)


def run_bench(args) -> int:
    from oneref.bench.main import run_bench as _run
    return _run(args)


def add_arguments(parser):
    from oneref.bench.main import add_arguments as _add
    return _add(parser)
