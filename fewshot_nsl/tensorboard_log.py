"""Optional TensorBoard logging of a run (``train.tensorboard: true``; the ``tensorboard`` extra).

The same scalars as ``metrics.jsonl``, written by :class:`TensorBoardLog` beside it in the run
directory (``RUN/tensorboard/``): every numeric value of a metrics record becomes the scalar
``EVENT/KEY`` at the record's step (``train/loss``, ``val/accuracy``, ...); a record with a
``shot`` (the test records) becomes ``EVENT/SHOT-shot/KEY`` (``test/5-shot/accuracy``).
``metrics.jsonl`` stays the record of the run; the TensorBoard files are a view of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewshot_nsl.config import ConfigError

__all__ = ["TENSORBOARD_DIR", "TensorBoardLog", "require_tensorboard"]

#: The folder of the TensorBoard event files inside a run directory.
TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`ConfigError` in one line when the
    ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(
            "train.tensorboard: true needs the tensorboard package "
            "(pip install 'fewshot-nsl[tensorboard]'), or set train.tensorboard=false"
        ) from error
    return SummaryWriter


def scalars(event: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars (tag → value) of one metrics record (see the module doc)."""
    prefix = f"{event}/{values['shot']}-shot" if "shot" in values else event
    return {
        f"{prefix}/{key}": float(value)
        for key, value in values.items()
        if key != "shot" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardLog:
    """A run's TensorBoard event files in ``run_dir/tensorboard`` (see the module doc)."""

    def __init__(self, run_dir: str | Path) -> None:
        writer_class = require_tensorboard()
        self.writer = writer_class(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log(self, event: str, step: int, values: Mapping[str, Any]) -> None:
        """Add the scalars of the metrics record ``event`` at ``step``."""
        for tag, value in scalars(event, values).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event files."""
        self.writer.close()
