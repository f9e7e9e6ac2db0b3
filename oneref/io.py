"""Files in and out, one policy for each direction.

* Writes are atomic: a temporary file beside the target, fsync, then ``os.replace``, so a
  process killed mid-write leaves the previous complete file (or none), never a torn one.
* Reads of pickled files never run code from the file unless the caller trusts it:
  :func:`load_pth` (``torch.load`` with ``weights_only`` and an allowlist, memory-mapped)
  for checkpoints and split files, :func:`load_pickle` (a plain-data unpickler) for the
  refer toolkit's ``refs(*).p``.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["atomic_write", "make_folder", "existing_file", "write_text", "write_json",
           "load_pth", "load_pickle", "TRUST_HINT"]

TRUST_HINT = "--trust-checkpoint (Python: allow_pickle=True)"
# numpy's array and scalar constructors: split files hold numpy boxes, official checkpoints
# numpy scalars (a logged accuracy). numpy 2 moved them from numpy.core to numpy._core; files
# written under numpy 1 name the old module.
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a fresh temporary file in ``path``'s folder, fsync it and
    move it onto ``path``. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def make_folder(path: str | Path, flag: str, create: bool = True) -> Path:
    """Create the folder ``path`` (and its parents) unless it exists; ValueError naming
    ``flag`` when it cannot be (a file there, no permission). ``create=False`` only checks
    that no file is there (nothing is written yet)."""
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "File exists")
    except OSError as err:
        what = "a file is there" if err.errno == errno.EEXIST else err.strerror
        raise ValueError(f"{flag} {path}: cannot create the folder ({what})") from None
    return path


def existing_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` when it is a file; else ValueError saying it is a folder, or that it does
    not exist (``hint``: how to make it, added then)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist{f' ({hint})' if hint else ''}")
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can
    only read it by setting it, which would race with threads creating files)."""
    try:
        with open("/proc/self/status") as handle:
            lines = handle.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, values, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``values`` as JSON to ``path`` atomically (non-JSON values as their str)."""
    return write_text(path, json.dumps(values, indent=indent, sort_keys=sort_keys,
                                       default=str) + "\n")


def _safe_globals() -> list:
    """What official checkpoints and split files pickle besides tensors and plain
    containers: training arguments (``argparse.Namespace``), numpy scalars and arrays."""
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                          np.int32, np.uint8, np.bool_)]
    return [argparse.Namespace, np.dtype, np.ndarray, *dtypes, _NUMPY_SCALAR, _NUMPY_RECONSTRUCT,
            (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
            (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct")]


def _allowed_names() -> set[str]:
    names = set()
    for entry in _safe_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def load_pth(path: str | Path, trust: bool = False, what: str = "checkpoint",
             hint: str = TRUST_HINT):
    """``torch.load`` a file safely: ``weights_only`` with the allowlist above, memory-mapped
    (an 8 GB file with optimizer state is not read into RAM twice; legacy files, which
    cannot be mapped, are read whole). ``trust=True`` unpickles anything: that runs code
    from the file. Errors are ValueErrors naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return _torch_load(path, trust, True, what, hint)
        except _NotMappable:
            return _torch_load(path, trust, False, what, hint)


class _NotMappable(Exception):
    """A legacy (non-zip) file: ``mmap=True`` cannot read it."""


def _torch_load(path: Path, trust: bool, mmap: bool, what: str, hint: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to word the message
            unsafe = []
        names = [n for n in unsafe if n not in _allowed_names()]
        if not names:
            raise ValueError(f"cannot read {what} {str(path)!r}: not a torch file, or a "
                             f"damaged one ({str(err).splitlines()[-1][:200]})") from err
        raise ValueError(f"{what} {str(path)!r} pickles {', '.join(names[:5])} besides its "
                         f"data; loading those would run code from the file. If you trust "
                         f"it, pass {hint}") from err
    except RuntimeError as err:
        if mmap and "mmap" in str(err):
            raise _NotMappable from err
        raise ValueError(f"cannot read {what} {str(path)!r} (truncated or not a torch "
                         f"file?): {err}") from err
    except Exception as err:  # noqa: BLE001 - a torn or foreign file fails in many ways
        raise ValueError(f"cannot read {what} {str(path)!r} (truncated or not a torch "
                         f"file?): {type(err).__name__}: {err}") from err


class _RefusedGlobal(pickle.UnpicklingError):
    """A class or function named in a plain-data pickle (its dotted name)."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, str, numbers): any class or function in the
    stream is refused with its name."""

    def find_class(self, module: str, name: str):
        raise _RefusedGlobal(f"{module}.{name}")


def load_pickle(path: str | Path, trust: bool = False, what: str = "pickle file",
                hint: str = "--trust-data"):
    """A plain-data pickle (the refer toolkit's ``refs(unc).p``); ``trust=True`` unpickles
    anything."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        return pickle.loads(data) if trust else _PlainUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as err:
        raise ValueError(f"{what} {str(path)!r} pickles {err} besides plain data; loading it "
                         f"would run code from the file. If you trust it, pass {hint}") from err
    except Exception as err:  # noqa: BLE001 - unpickling raises many types for a bad file
        raise ValueError(f"cannot read {what} {str(path)!r}: {type(err).__name__}: "
                         f"{err}") from err
