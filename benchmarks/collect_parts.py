"""Gather the GPU check's per-part results.json files into one JSON list (no torch import).

``benchmarks/gpu_check.sh`` runs this after every part, so its output folder holds every
row measured so far even if the run is stopped before its merge. ``oneref bench --merge
parts.json --out DIR`` builds the tables and plots from it later::

    python benchmarks/collect_parts.py OUT.json PART.json [PART.json ...]

A part that cannot be read (a process killed as it wrote) is named on stderr and left out.
"""

import json
import os
import sys
from pathlib import Path


def collect(out: Path, parts: list[Path]) -> int:
    """Write the readable ``parts`` to ``out`` atomically; returns how many were unreadable."""
    gathered, unreadable = [], 0
    for part in parts:
        try:
            gathered.append(json.loads(part.read_text()))
        except (OSError, ValueError) as e:
            print(f"collect_parts: {part}: not read ({type(e).__name__}: {e})", file=sys.stderr)
            unreadable += 1
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(gathered))
    os.replace(tmp, out)
    return unreadable


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(1 if collect(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]) else 0)
