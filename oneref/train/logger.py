"""Run logging on rank 0: CSV rows, TensorBoard scalars, the training-curve PNG.

``metrics.csv`` has one row per logged step (``step, lr, loss, <loss parts>, samples_per_s,
elapsed_s``) plus rows for evaluations (``split`` column). On resume, rows past the resumed
step are dropped so the file reads as one uninterrupted curve.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from oneref.io import atomic_write

__all__ = ["RunLogger", "plot_curve", "read_rows"]

log = logging.getLogger(__name__)


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``<run_dir>/metrics.csv`` (string values), [] when there is none."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class RunLogger:
    """Append scalars to ``<run>/metrics.csv`` and ``<run>/tb`` (TensorBoard).

    Args:
        run_dir: the run folder.
        enabled: False on ranks other than 0 (every call is then a no-op).
        resume_step: on resume, drop CSV rows with ``step > resume_step``.
        tensorboard: write TensorBoard events too.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self.rows = [r for r in read_rows(run_dir) if int(r["step"]) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            except Exception as exc:  # noqa: BLE001 - TensorBoard is optional at run time
                log.warning("TensorBoard logging off (%s); pip install tensorboard", exc)

    def _fields(self) -> list[str]:
        fields: list[str] = []
        for row in self.rows:
            fields.extend(k for k in row if k not in fields)
        return fields

    def _rewrite(self) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self._fields(), restval="")
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)

    def log(self, step: int, values: dict, split: str = "train") -> None:
        """Record ``values`` (name -> float) at ``step`` for ``split``."""
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _fmt(v) for k, v in values.items()}}
        new_keys = any(k not in self._fields() for k in row)
        self.rows.append(row)
        if new_keys or not self.path.exists():
            self._rewrite()
        else:
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._fields(), restval="").writerow(row)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def plot_curve(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Training loss (and eval metrics, right axis) against step, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        log.warning("matplotlib missing: no training-curve PNG")
        return None
    train = [r for r in rows if r.get("split") == "train" and r.get("loss") not in (None, "")]
    evals = [r for r in rows if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train],
                color="tab:blue", lw=1.2, label="train loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    metric = next((k for k in ("acc@0.5", "miou") if evals and evals[0].get(k)), None)
    if metric:
        ax2 = ax.twinx()
        ax2.plot([int(r["step"]) for r in evals], [float(r[metric]) for r in evals], "o-",
                 color="tab:orange", label=f"val {metric}")
        ax2.set_ylabel(f"val {metric}")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
