"""The measured per-op backend policy of ``auto`` on CUDA (docs/ops.md, "Policy").

For each GPU generation (``sm90`` = Hopper: H100, H200) and op, the committed table
``policy.json`` names the backend to run in training (forward + backward measured) and in
inference (forward measured), with the measurement behind the choice. A backend is chosen
only when it was faster than the torch composite in every case measured for that pass; an
op, pass or generation without such a row runs the torch composite (cuBLAS GEMMs, cuDNN
attention).

The table is written from ``oneref bench`` results::

    oneref bench --write-policy benchmarks/results/h100-2026-11-27/*/results.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from oneref.io import write_json
from oneref.ops.registry import OPS

__all__ = ["POLICY_PATH", "load_policy", "choice", "generation", "build_policy", "write_policy"]

log = logging.getLogger(__name__)

POLICY_PATH = Path(__file__).with_name("policy.json")
PASSES = ("train", "infer")
_policy_cache: dict | None = None


def generation(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``"sm90"``."""
    return f"sm{capability[0]}{capability[1]}"


def load_policy() -> dict:
    """The committed table (read once)."""
    global _policy_cache
    if _policy_cache is None:
        _policy_cache = json.loads(POLICY_PATH.read_text()) if POLICY_PATH.is_file() else {}
    return _policy_cache


def choice(op: str, gen: str, training: bool) -> tuple[str, str]:
    """(backend, why) of ``op`` on generation ``gen`` for training or inference. An op that
    runs another's kernels follows that op's row until it has a row of its own
    (:attr:`OpSpec.measured_as`)."""
    rows = load_policy().get(gen, {}).get("ops", {})
    pass_ = "train" if training else "infer"
    entry = rows.get(op, {}).get(pass_)
    if entry is None and op in OPS:
        entry = rows.get(OPS[op].policy_key, {}).get(pass_)
    if entry is None:
        return "torch", f"not measured on {gen}: the torch composite"
    return entry["backend"], entry["why"]


def _pass_of(row: dict) -> tuple[str, ...]:
    """The passes a kernel row measures: its ``pass`` field, ``fwd+bwd`` in its shape, or
    (an op without a backward, such as the referring mask) both."""
    label = row.get("pass") or ("fwd+bwd" if "fwd+bwd" in row.get("shape", "") else "fwd")
    if row["op"] == "referring_mask":
        return PASSES
    return ("train",) if label == "fwd+bwd" else ("infer",)


def build_policy(results: list[dict]) -> dict:
    """The policy of each generation found in ``results`` (parsed ``results.json`` files)."""
    speedups: dict[tuple[str, str, str, str], list[float]] = {}
    sources: dict[str, list[str]] = {}
    for result in results:
        env = result["environment"]
        if env.get("device_type") != "cuda" or not env.get("capability"):
            continue
        major, minor = (int(v) for v in str(env["capability"]).split("."))
        gen = generation((major, minor))
        sources.setdefault(gen, []).append(f"{env.get('device_name')}, {env['date_utc'][:10]}")
        for row in result.get("kernel_rows", []):
            impl = row.get("impl", "")
            if not impl.startswith("ours[") or impl == "ours[auto]" or "speedup" not in row:
                continue
            backend = impl[5:-1]
            for pass_ in _pass_of(row):
                speedups.setdefault((gen, row["op"], pass_, backend), []).append(row["speedup"])
    policy: dict = {}
    for (gen, op, pass_, backend), values in sorted(speedups.items()):
        worst = min(values)
        entries = policy.setdefault(gen, {"measured_on": sorted(set(sources[gen])), "ops": {}})
        best = entries["ops"].setdefault(op, {}).get(pass_)
        if worst > 1.0 and (best is None or best["backend"] == "torch" or worst > best["worst"]):
            entries["ops"][op][pass_] = {
                "backend": backend, "worst": round(worst, 3),
                "why": f"{backend} {worst:.2f}-{max(values):.2f}x the torch composite over "
                       f"{len(values)} case(s) ({'; '.join(entries['measured_on'])})"}
        elif best is None:
            entries["ops"][op][pass_] = {
                "backend": "torch", "worst": 1.0,
                "why": f"no backend faster in every case ({backend}: {worst:.2f}-"
                       f"{max(values):.2f}x)"}
    return policy


def write_policy(result_paths: list[str], out: str | Path = POLICY_PATH) -> Path:
    """Write the policy of ``results.json`` files of ``oneref bench`` to ``out``."""
    results = [json.loads(Path(p).read_text()) for p in result_paths]
    return write_json(out, build_policy(results))
