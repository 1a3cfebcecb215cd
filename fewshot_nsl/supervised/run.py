"""One supervised run: train, checkpoint, evaluate and write the run directory.

Run directory (:class:`fewshot_nsl.runlog.RunDir`)::

    config.yaml     resolved config, incl. data.{mean,std,num_classes,image_shape}
    meta.json       library versions, git commit, data fingerprint, command line
    metrics.jsonl   {"event": "train", "step", "loss", "train_accuracy", "lr"} every log_every
                    {"event": "test", "step", "test_error", "test_loss"} every eval_every
    last.pt         checkpoint (fewshot_nsl.checkpoint format) every checkpoint_every and at
                    the end; ``train-supervised --resume`` continues from it
    results.json    test error, parameter counts, inference images/s (see
                    SupervisedTrainer.summary)

The run itself is the training engine's (:class:`fewshot_nsl.engine.Engine`): the bad data
fails before the directory is created, ``--resume`` refuses a checkpoint of another config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fewshot_nsl.supervised.data import ClassificationData
from fewshot_nsl.supervised.train import SupervisedTrainer, run_dir_for

__all__ = ["format_results", "run_dir_for", "run_supervised"]


def run_supervised(
    config: Mapping[str, Any],
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    data: ClassificationData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` (a resolved supervised config), write its run directory, return results.

    Args:
        out_dir: run directory (default :func:`run_dir_for`).
        resume: continue from ``last.pt`` of the run directory if there is one; the continued
            run is the same as an uninterrupted one (batches and augmentation are functions
            of the iteration).
        overwrite: remove the run already in ``out_dir`` (whole) and start a fresh one
            (without it, a fresh run into a directory holding a run is refused).
        progress: a tqdm bar when stderr is a terminal, else one line per log record.
        data: preloaded data (else loaded from ``config["data"]``).
        log: where one-line messages go (default: stderr).
    """
    trainer = SupervisedTrainer(config, out_dir, data=data, quiet=not progress, log=log)
    return trainer.fit(resume=resume, overwrite=overwrite)


def format_results(results: Mapping[str, Any]) -> str:
    """A few human-readable lines summarising ``results.json``."""
    lines = [
        f"{results.get('name')}: test error {100 * results['test_error']:.2f}% on "
        f"{results['test_images']} {results['dataset']} test images after "
        f"{results['iterations']} iterations ({results['train_time_s']:.0f} s training)",
        f"  parameters {results['parameters']:,} (NSL-only {results['nsl_parameters']:,})",
    ]
    if "inference_images_per_s" in results:
        lines.append(f"  inference {results['inference_images_per_s']:.0f} images/s")
    if "folded_test_error" in results:
        line = (
            f"  folded: test error {100 * results['folded_test_error']:.2f}%, "
            f"{results['folded_parameters']:,} parameters"
        )
        if "folded_inference_images_per_s" in results:
            line += (
                f", {results['folded_inference_images_per_s']:.0f} images/s "
                f"({results['folded_time_ratio']:.2f}x the unfolded time)"
            )
        lines.append(line)
    lines.append(f"  run directory: {results['run_dir']}")
    return "\n".join(lines)
