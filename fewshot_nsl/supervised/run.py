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
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fewshot_nsl.checkpoint import (
    CheckpointMismatch,
    config_differences,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from fewshot_nsl.runlog import RunDir
from fewshot_nsl.supervised.data import ClassificationData
from fewshot_nsl.supervised.train import SupervisedTrainer

CHECKPOINT = "last.pt"

#: Keys that may change between an interrupted run and its resumption: they do not change
#: the trajectory up to the checkpoint.
RESUMABLE_CHANGES = (
    "name",
    "train.iterations",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.device",
    "train.out_dir",
    "eval.",
)


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """``train.out_dir``, else ``runs/supervised/NAME``."""
    name = str(config.get("name") or "run")
    return Path(config["train"]["out_dir"] or Path("runs") / "supervised" / name)


def save_trainer_checkpoint(trainer: SupervisedTrainer, path: str | Path) -> Path:
    """Write the trainer's state as a :mod:`fewshot_nsl.checkpoint` file (what ``export``
    and ``--resume`` read)."""
    return save_checkpoint(
        path,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=None,  # the learning rate is a function of the iteration (see _set_lr)
        step=trainer.iteration,
        config=trainer.config,
        data={"train+test": trainer.data.fingerprint},
    )


def _restore(trainer: SupervisedTrainer, path: Path) -> None:
    checkpoint = load_checkpoint(path, map_location=trainer.device)
    differences = [
        line
        for line in config_differences(checkpoint["config"], trainer.config)
        if not line.startswith(RESUMABLE_CHANGES)
    ]
    if differences:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the config differs from the checkpoint's in "
            + "; ".join(differences[:6])
        )
    saved = checkpoint["data"].get("train+test")
    if saved != trainer.data.fingerprint:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the data changed (fingerprint {saved} in the "
            f"checkpoint, {trainer.data.fingerprint} now)"
        )
    load_model_state(trainer.model, checkpoint["model"], str(path))
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.iteration = int(checkpoint["step"])


def run_supervised(
    config: Mapping[str, Any],
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
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
        progress: a tqdm bar when stderr is a terminal, else one line per log record.
        data: preloaded data (else loaded from ``config["data"]``).
        log: where one-line messages go (default: stderr).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    trainer = SupervisedTrainer(config, data)  # bad data fails before a run dir is created
    run_dir = RunDir(out_dir if out_dir is not None else run_dir_for(config))
    checkpoint = run_dir.file(CHECKPOINT)
    if resume and checkpoint.is_file():
        _restore(trainer, checkpoint)
        run_dir.truncate_metrics(trainer.iteration)
        log(f"resumed {run_dir.path} at iteration {trainer.iteration}")
    else:
        run_dir.write_meta(data={"train+test": trainer.data.fingerprint})
    run_dir.write_config(trainer.config)

    show_bar = progress and sys.stderr.isatty()

    def on_log(record: dict[str, Any]) -> None:
        record = dict(record)
        event = "test" if "test_error" in record else "train"
        step = record.pop("iteration")
        run_dir.log(event, step, **record)
        if progress and not show_bar:  # a log file, not a terminal: one line per record
            values = ", ".join(f"{key} {value:.4g}" for key, value in record.items())
            log(f"iteration {step}/{trainer.config['train']['iterations']}: {values}")

    trainer.train(
        progress=show_bar,
        on_log=on_log,
        on_checkpoint=lambda t: save_trainer_checkpoint(t, checkpoint),
    )
    save_trainer_checkpoint(trainer, checkpoint)
    results = trainer.summary()
    results["run_dir"] = str(run_dir.path)
    results["name"] = trainer.config.get("name")
    run_dir.log("test", trainer.iteration, test_error=results["test_error"],
                test_loss=results["test_loss"])
    run_dir.write_json(RunDir.RESULTS, results)
    return results


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
        line = (f"  folded: test error {100 * results['folded_test_error']:.2f}%, "
                f"{results['folded_parameters']:,} parameters")
        if "folded_inference_images_per_s" in results:
            line += (f", {results['folded_inference_images_per_s']:.0f} images/s "
                     f"({results['folded_time_ratio']:.2f}x the unfolded time)")
        lines.append(line)
    lines.append(f"  run directory: {results['run_dir']}")
    return "\n".join(lines)
