"""Training checkpoints: atomic writes, keep-last-k, RNG capture for exact resume.

A checkpoint is one file ``<run>/checkpoints/step_00001234.pt`` holding the model, optimizer,
lr-plan state, step, epoch, every RNG (python, numpy, torch CPU, every CUDA device; for
pre-training also the masking generator), the sampler state and the model's config. It is
written to a temporary file in the same folder and moved into place with ``os.replace``, so
a kill mid-write never leaves a torn file.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from oneref.io import atomic_write, load_pth

__all__ = ["rng_state", "set_rng_state", "checkpoint_path", "save_checkpoint", "load_latest",
           "load_checkpoint", "list_checkpoints"]

log = logging.getLogger(__name__)
_PATTERN = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict:
    """This process's global RNGs: python, numpy, torch CPU and its CUDA device's. Plain
    containers and tensors only (numpy's key array as a tensor), so a checkpoint loads with
    ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (its CUDA state onto the current device; from checkpoints
    that kept every device's, the current device's entry, if they had one)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


#: ``--resume`` values that mean the newest checkpoint of the run folder (``--output-dir``).
NEWEST = ("auto", "latest")


def run_folder_of(path: str | Path) -> Path:
    """The run folder a ``--resume`` path names: itself, or the run whose checkpoints/ is
    that folder or holds that step file."""
    path = Path(path)
    if path.name == "checkpoints" and path.is_dir():
        return path.parent
    return path.parent.parent if path.parent.name == "checkpoints" else path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Step checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``."""
    return Path(folder) / f"step_{step:08d}.pt"


def save_checkpoint(folder: str | Path, step: int, payload: dict, keep_last: int = 0) -> Path:
    """Write ``payload`` as ``folder/step_{step:08d}.pt``; delete all but the newest
    ``keep_last`` (0 keeps all)."""
    path = checkpoint_path(folder, step)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    log.info("checkpoint written: %s", path)
    return path


def load_latest(path: str | Path, trust: bool = False, flag: str = "--resume",
                quiet: bool = False) -> tuple[Path, dict]:
    """The newest readable checkpoint at ``path`` (a checkpoint file, or a run folder) and
    its contents. Newer files that cannot be read (torn by a crash, say) are skipped with a
    warning naming each and why (none when ``quiet``); ValueError, starting with ``flag``,
    when none is readable."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag}: {path} does not exist (a run folder or a step_*.pt "
                         "checkpoint is expected)")
    candidates = [path] if path.is_file() else (list_checkpoints(path / "checkpoints")
                                               or list_checkpoints(path))[::-1]
    if not candidates:
        raise ValueError(f"{flag}: no checkpoint found in {path} (looked for "
                         f"checkpoints/step_*.pt)")
    problems = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate, trust=trust)
        except ValueError as err:
            if "pickles" in str(err):  # readable, but only if trusted: the user decides
                raise
            problems.append(f"{candidate.name}: {err}")
            if not quiet:
                log.warning("skipping unreadable checkpoint %s: %s", candidate, err)
            continue
        if problems and not quiet:
            log.warning("using %s, the newest readable checkpoint", candidate)
        return candidate, state
    raise ValueError(f"{flag}: no readable checkpoint in {path}: " + "; ".join(problems))


def load_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """Read a checkpoint (tensors and plain containers only, unless ``trust``: checkpoints of
    older versions pickle numpy RNG state); ValueError naming the file when it is missing or
    unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return load_pth(path, trust=trust, what="training checkpoint",
                    hint="--trust-checkpoint (a checkpoint of an older oneref pickles numpy "
                         "RNG state)")
