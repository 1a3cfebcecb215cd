"""The ``fewshot-nsl`` command line (see docs/cli.md).

Over 400 lines: the parser and the handlers of every few-shot command (train, eval,
prepare-data, list) in one place, each a short function over the library.

Commands: ``train`` (meta-train + test, resumable), ``eval`` (score checkpoints on frozen test
episodes, paired comparison), ``prepare-data`` (build a dataset cache), ``list`` (datasets,
backbones, learners, configs), plus the supervised commands of :mod:`fewshot_nsl.supervised`.

User errors (a bad config key, missing data, a checkpoint from another config, a bad
manifest) end the program with exit status 2 and one ``fewshot-nsl: error: ...`` message, no
traceback; ``FEWSHOT_NSL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from episodes.fileio import StorageError
from fewshot_nsl import __version__
from fewshot_nsl.allocator import apply_allocator_policy
from fewshot_nsl.checkpoint import CheckpointMismatch
from fewshot_nsl.config import ConfigError, dump_config, iter_runs, normalized_config
from fewshot_nsl.fewshot_config import FEWSHOT_DEFAULTS, iter_seed_runs, load_fewshot_config
from fewshot_nsl.lake_report import lake_run_report, report_from_results
from fewshot_nsl.supervised import register_cli as register_supervised_cli

__all__ = ["main", "build_parser", "format_table", "result_rows"]

EXIT_USAGE = 2
CONFIG_DIRS = (Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs")


# -- tables ------------------------------------------------------------------------------


#: The columns of the printed result table (the rows hold more: see :func:`result_rows`).
TABLE_COLUMNS = ("method", "backbone", "way", "shot", "query", "accuracy", "episodes")


def result_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (one per test shot) of a ``results.json`` payload: the numbers (``mean``,
    ``ci95`` as fractions, ``episodes``, ``query`` per class) and ``accuracy``, the same as a
    human string in percent (``"73.99 ± 0.84"``)."""
    rows = []
    for shot, test in results["test"].items():
        rows.append(
            {
                "method": results["name"],
                "backbone": results["backbone"],
                "seed": results.get("seed"),
                "way": test["way"],
                "shot": int(shot),
                "query": test["query"],
                "accuracy": f"{100 * test['mean']:.2f} ± {100 * test['ci95']:.2f}",
                "mean": test["mean"],
                "ci95": test["ci95"],
                "episodes": test["episodes"],
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts), columns in order, left-aligned."""
    if not rows:
        return "(no results)"
    columns = list(columns or rows[0].keys())
    header = {
        column: "accuracy (%) ± 95% CI" if column == "accuracy" else column for column in columns
    }
    widths = {
        column: max(len(header[column]), *(len(str(row.get(column, ""))) for row in rows))
        for column in columns
    }
    lines = ["  ".join(header[c].ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


# -- train -------------------------------------------------------------------------------


def _completed(run_dir: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The results of a run directory that already finished ``train.steps`` steps (or stopped
    early) with this config (else None); a checkpoint of another config is an error, as when
    resuming."""
    from fewshot_nsl.checkpoint import load_checkpoint
    from fewshot_nsl.engine import check_resumable
    from fewshot_nsl.runner import RESUMABLE_CHANGES

    path, last = run_dir / "results.json", run_dir / "last.pt"
    if not path.is_file() or not last.is_file():  # no last.pt: the engine says what to do
        return None
    results = json.loads(path.read_text())
    if results.get("steps") != config["train"]["steps"] and not results.get("stopped_early"):
        return None
    saved = normalized_config(load_checkpoint(last)["config"], FEWSHOT_DEFAULTS)
    check_resumable(saved, config, last, RESUMABLE_CHANGES)
    return results


def command_train(args: argparse.Namespace) -> int:
    from fewshot_nsl.distributed import broadcast_object, build_trainer, init_distributed, shutdown
    from fewshot_nsl.engine import TrainingInterrupted, refuse_existing_run
    from fewshot_nsl.runlog import RunDir, RunLock, remove_run
    from fewshot_nsl.runner import run_dir_for

    if args.config is None and args.resume is None:
        raise ConfigError("train needs --config FILE (or --resume DIR of an earlier run)")
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None and not (resume_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {resume_dir}: no config.yaml, not a run directory")
    config_path = Path(args.config) if args.config else resume_dir / "config.yaml"
    overrides = list(args.overrides)
    if args.seeds:  # the same as the override train.seeds=[...]
        overrides.append(f"train.seeds={list(args.seeds)}")
    config = load_fewshot_config(config_path, overrides)
    root = Path(args.out) if args.out else resume_dir or run_dir_for(config)
    resume, overwrite = resume_dir is not None, bool(args.overwrite)
    runs = config.get("runs") or {}
    seeded = any(run["train"]["seeds"] for _, run in iter_runs(config))
    multi = bool(runs) or seeded  # a root folder of several runs: its config and summary
    if runs:
        for name, run in runs.items():
            run["train"]["out_dir"] = str(root / name)
    config["train"]["out_dir"] = str(root)
    single_runs = list(iter_seed_runs(config))  # train.seeds: one run per seed, OUT/seed-S

    # Under torchrun: join the process group (docs/distributed.md); alone: no process group.
    context = init_distributed(config["train"]["device"])
    root_lock = RunLock(root) if multi and context.is_main else None
    started = time.perf_counter()
    all_results = []
    try:
        for name, run in single_runs:
            out_dir = Path(run["train"]["out_dir"])
            done = _completed(out_dir, run) if resume else None
            done = broadcast_object(done)  # rank 0 decides: other nodes may not see its files
            if done is not None:
                if context.is_main:
                    print(
                        f"[{name}] already finished in {out_dir}; reusing its results",
                        file=sys.stderr,
                    )
                all_results.append(done)
                continue
            trainer = build_trainer(
                run, out_dir, context, quiet=args.quiet, verify_data=args.verify_data
            )
            if root_lock is not None and not root_lock.held:
                # A multi-run root is created (locked, emptied with --overwrite, its config
                # written) only once the first run's checks pass and its data is there.
                if not resume and not overwrite:
                    refuse_existing_run(root)
                trainer.check_run_dir(resume, overwrite)
                trainer.build()
                root_lock.acquire()
                if not resume and not overwrite:
                    refuse_existing_run(root)  # again, under the lock
                if overwrite and RunDir(root).holds_run():
                    remove_run(root)
                    print(f"--overwrite: removed the runs in {root}", file=sys.stderr)
                dump_config(config, root / "config.yaml")
            all_results.append(trainer.fit(resume=resume, overwrite=overwrite))
    except TrainingInterrupted as stop:
        stop.resume_command = f"fewshot-nsl train --resume {root.resolve()}"
        raise
    finally:
        if root_lock is not None:
            root_lock.release()
    wall_time = time.perf_counter() - started
    shutdown(context)
    if not context.is_main:
        return 0

    rows = [row for results in all_results for row in result_rows(results)]
    print()
    print(format_table(rows, ("seed", *TABLE_COLUMNS) if seeded else TABLE_COLUMNS))
    for (_, run), results in zip(single_runs, all_results):  # the Lake runs: per run
        for block in report_from_results(run, results):
            print(f"\n{block}")
    print(f"\nwall time {wall_time:.0f} s; run directory {root}")
    if multi:
        summary = {
            "config": str(config_path),
            "wall_time_s": round(wall_time, 1),
            "rows": rows,
            "runs": {name: run["train"]["out_dir"] for name, run in single_runs},
        }
        RunDir(root).write_json("summary.json", summary)
    return 0


# -- eval --------------------------------------------------------------------------------


def checkpoint_argument(value: str, option: str = "--checkpoint") -> Path:
    """The checkpoint file a ``--checkpoint`` value names: the file itself, or for a run
    directory its ``best.pt`` (else ``last.pt``), said on stderr."""
    from fewshot_nsl.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(value)
    if Path(value).is_dir():
        print(f"{option} {value}: a run directory, using {path}", file=sys.stderr)
    return path


def _loaded_learner(path: Path, device: Any, verify: str) -> tuple[Any, dict[str, Any], Any]:
    """(learner with the checkpoint's weights, its config, its test split checked at level
    ``verify`` against the cache's content hashes)."""
    from fewshot_nsl.checkpoint import load_checkpoint, load_model_state, require_kind
    from fewshot_nsl.runner import build_model, load_split

    checkpoint = load_checkpoint(path, map_location=device)
    require_kind(checkpoint, "episodic", path)
    config = checkpoint["config"]
    split = load_split(config, "test", verify=verify)
    saved = checkpoint["data"].get("test")
    if saved is not None and saved != split.fingerprint:
        raise CheckpointMismatch(
            f"{path}: its test data fingerprint {saved} differs from {split.fingerprint} "
            f"of the data at data.root={config['data']['root']}"
        )
    learner = build_model(config, in_channels=split.image_shape[0]).to(device)
    load_model_state(learner, checkpoint["model"], str(path))
    return learner, config, split


def _comparable(
    config_a: Mapping[str, Any],
    config_b: Mapping[str, Any],
    split_a: Any,
    split_b: Any,
    path_b: Path,
) -> None:
    """Two checkpoints can be scored on the same episodes only on the same data and way."""
    problems = []
    if split_a.fingerprint != split_b.fingerprint:
        problems.append(f"test data {split_a.fingerprint} vs {split_b.fingerprint}")
    if config_a["episodes"]["way"] != config_b["episodes"]["way"]:
        problems.append(f"way {config_a['episodes']['way']} vs {config_b['episodes']['way']}")
    if problems:
        raise CheckpointMismatch(
            f"--compare {path_b}: cannot score both on the same episodes: " + "; ".join(problems)
        )


def _eval_progress(quiet: bool) -> dict[str, Any]:
    """How ``eval`` shows its progress (``evaluate_shots`` arguments): a bar on a terminal,
    else a line to stderr every tenth of the episodes; nothing with ``--quiet``."""
    return {
        "show_progress": not quiet and sys.stderr.isatty(),
        "log": None if quiet else lambda line: print(line, file=sys.stderr, flush=True),
    }


def _free_file_name(path: Path) -> Path:
    """``path`` when no such file exists, else the first free of ``STEM-2.SUFFIX``,
    ``STEM-3.SUFFIX``, ..."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def _eval_json_path(args: argparse.Namespace, checkpoint: Path) -> Path:
    """Where ``eval`` writes its JSON, never over an earlier file without ``--overwrite``:
    ``--json FILE`` that exists is refused; the default ``eval_<checkpoint>.json`` next to
    the checkpoint, when an earlier eval wrote it, becomes ``eval_<checkpoint>-2.json``
    (``-3``, ...), said on stderr (with ``--quiet`` only by the final ``wrote FILE``)."""
    if args.json:
        out = Path(args.json)
        if out.is_dir():
            raise FileExistsError(f"--json {out} is a folder; give a file name")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--json {out} already exists (--overwrite replaces it)")
        return out
    default = checkpoint.with_name(f"eval_{checkpoint.stem}.json")
    if args.overwrite or not default.exists():
        return default
    out = _free_file_name(default)
    if not args.quiet:
        print(
            f"eval: {default} exists (an earlier eval): writing {out} "
            "(--overwrite replaces the earlier one, --json FILE names another)",
            file=sys.stderr,
        )
    return out


def _test_scores(
    path: Path,
    learner: Any,
    config: Mapping[str, Any],
    split: Any,
    evaluate: dict[str, Any],
    args: argparse.Namespace,
) -> dict[int, Any]:
    """Test results of the checkpoint at ``path`` on ``config``'s test episodes: those stored
    in its run's ``results.json`` when they are exactly these episodes (unless
    ``--rescore``; said on stderr unless ``--quiet``), else scored now."""
    from fewshot_nsl.evaluation import evaluate_shots, stored_test_results

    if not args.rescore:
        keys = ("shots", "num_episodes", "manifest")
        stored = stored_test_results(path, config, split, **{k: evaluate[k] for k in keys})
        if stored is not None:
            if not args.quiet:
                print(
                    f"{path}: reusing the per-episode accuracies in its run's results.json (the "
                    "same test episodes and data; --rescore to score again)",
                    file=sys.stderr,
                )
            return stored
    return evaluate_shots(learner, config, split, **evaluate)


def command_eval(args: argparse.Namespace) -> int:
    from episodes.fileio import atomic_write, check_writable
    from fewshot_nsl.engine import resolve_device
    from fewshot_nsl.evaluation import EvalResult
    from fewshot_nsl.stats import paired_difference

    device = resolve_device(args.device)
    path = checkpoint_argument(args.checkpoint)
    path_b = checkpoint_argument(args.compare, "--compare") if args.compare else None
    out = _eval_json_path(args, path)
    try:  # now, not after the evaluation
        check_writable(out.parent)
    except StorageError as error:
        if args.json:
            raise
        raise StorageError(f"{error} (write the results elsewhere with --json FILE)") from error
    learner, config, split = _loaded_learner(path, device, args.verify_data)
    protocol = {"test_query": args.query, "test_way": args.way}  # the other protocol, if asked
    config["episodes"].update({key: value for key, value in protocol.items() if value})
    if args.way and args.way != config["episodes"]["way"] and not learner.any_way:
        raise ConfigError(
            f"--way {args.way}: learner {config['learner']['name']!r} has a "
            f"{config['episodes']['way']}-way head; it can only be tested at that way"
        )
    if config["train"]["threads"] is not None:  # as the run itself was evaluated
        torch.set_num_threads(config["train"]["threads"])
    episodes = config["episodes"]
    shots = args.shots or episodes["test_shots"]
    num_episodes = args.episodes or episodes["test_episodes"]
    manifest = args.manifest or episodes["manifest"]
    if manifest and len(shots) > 1 and "{shot}" not in manifest:
        raise ConfigError(
            f"--manifest {manifest}: one manifest holds one shot setting; give a single --shots "
            "value or a path with '{shot}' in it"
        )
    evaluate = {
        "shots": shots,
        "num_episodes": num_episodes,
        "device": device,
        "manifest": manifest,
        **_eval_progress(args.quiet),
    }
    results_a = _test_scores(path, learner, config, split, evaluate, args)
    models: list[tuple[str, dict[str, Any], dict[int, EvalResult]]] = [
        (str(config["name"]), config, results_a)
    ]
    if path_b is not None:
        learner_b, config_b, split_b = _loaded_learner(path_b, device, args.verify_data)
        _comparable(config, config_b, split, split_b, path_b)
        # Scored with A's config: the same episodes (seed, query, manifest) for both.
        results_b = _test_scores(
            path_b, learner_b, config, split, {**evaluate, "label": config_b["name"]}, args
        )
        name_b = str(config_b["name"])
        if name_b == models[0][0]:
            name_b += f" ({path_b})"
        models.append((name_b, config_b, results_b))

    rows, payload = [], {"checkpoint": str(path), "models": {}, "paired": {}}
    for name, model_config, results in models:
        payload["models"][name] = {
            "config": model_config,
            "test": {str(shot): result.as_dict() for shot, result in results.items()},
        }
        for shot, result in results.items():
            summary = result.summary
            rows.append(
                {
                    "method": name,
                    "backbone": model_config["model"]["backbone"],
                    "way": result.way,
                    "shot": shot,
                    "query": result.query,
                    "accuracy": summary.format(),
                    "episodes": summary.n,
                }
            )
    print(format_table(rows))
    for name, _, results in models:  # the Lake runs: error per run, mean ± CI over runs
        accuracies = {shot: result.accuracies for shot, result in results.items()}
        for block in lake_run_report(name, split, manifest, accuracies):
            print(f"\n{block}")
    if args.compare:
        (name_a, _, res_a), (name_b, _, res_b) = models
        print(f"\npaired difference on the same episodes ({name_a} − {name_b}):")
        for shot in shots:
            difference = paired_difference(res_a[shot].accuracies, res_b[shot].accuracies)
            payload["paired"][str(shot)] = {"a": name_a, "b": name_b, **difference.as_dict()}
            print(f"  {shot}-shot: {difference.format()} points over {difference.n} episodes")
    text = json.dumps(payload, indent=2).encode()
    if out.exists() and not args.overwrite:  # written since the start (another eval?)
        taken, out = out, _free_file_name(out)
        print(f"eval: {taken} was written meanwhile: writing {out} instead", file=sys.stderr)
    atomic_write(out, lambda handle: handle.write(text))
    print(f"\nwrote {out}")
    return 0


# -- prepare-data, list ------------------------------------------------------------------


def command_prepare_data(args: argparse.Namespace) -> int:
    from episodes import prepare_dataset

    # Only the options the user gave: each dataset rejects options it does not take.
    given = {
        "split_file": args.split_file,
        "image_size": args.image_size,
        "channels": args.channels,
        "protocol": args.protocol,
        "background": args.background,
        "val_fraction": args.val_fraction,
    }
    options = {key: value for key, value in given.items() if value is not None}
    if args.no_rotations:
        options["rotations"] = False
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists (--overwrite replaces it)")
    out = prepare_dataset(
        args.dataset,
        args.source,
        args.out,
        strict=not args.no_strict,
        overwrite=args.overwrite,
        **options,
    )
    print(
        f"wrote {args.dataset} cache to {out}; train with data.dataset={args.dataset} "
        f"data.root={out}"
    )
    return 0


def shipped_configs() -> dict[Path, list[str]]:
    """YAML configs in ./configs and in the source checkout's configs/: ``{folder: file
    names relative to it}``, a file found in both folders listed once."""
    seen: set[Path] = set()
    found: dict[Path, list[str]] = {}
    for folder in CONFIG_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.yaml")):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                found.setdefault(folder, []).append(path.relative_to(folder).as_posix())
    return found


def _shown_folder(folder: Path) -> str:
    """``folder`` relative to the working directory when it is below it, else absolute."""
    relative = os.path.relpath(folder)
    return str(folder) if relative.startswith("..") else relative


def reference_lines(path: Path) -> list[str]:
    """What config ``path`` reproduces, from its ``reference:`` block: the ``reproduces`` and
    ``published`` lines and the number of deviations (``[]`` without a block)."""
    import yaml

    try:
        reference = (yaml.safe_load(path.read_text()) or {}).get("reference")
    except (OSError, yaml.YAMLError) as error:
        return [f"(unreadable: {error})"]
    if not isinstance(reference, Mapping):
        return []
    deviations = reference.get("deviations") or []
    return [
        f"reproduces: {reference.get('reproduces')}",
        f"published: {reference.get('published') or 'none'}; {len(deviations)} deviation(s) "
        "listed in the file",
    ]


def command_list(args: argparse.Namespace) -> int:
    from episodes import list_datasets
    from fewshot_nsl.backbones import list_backbones
    from fewshot_nsl.learners import list_learners

    def configs() -> dict[str, list[str]]:
        found = shipped_configs()
        if not found:
            return {"configs (none in ./configs)": []}
        # Each config, then what it reproduces (its reference: block), indented below it.
        return {
            f"configs (in {_shown_folder(folder)})": [
                line
                for name in names
                for line in [name, *(f"    {text}" for text in reference_lines(folder / name))]
            ]
            for folder, names in found.items()
        }

    listings = {
        "datasets": lambda: {"datasets": list_datasets()},
        "backbones": lambda: {"backbones": list_backbones()},
        "learners": lambda: {"learners": list_learners()},
        "configs": configs,
    }
    for what in [args.what] if args.what else listings:
        for heading, items in listings[what]().items():
            print(f"{heading}:")
            for item in items:
                print(f"  {item}")
    return 0


# -- report ------------------------------------------------------------------------------


def command_report(args: argparse.Namespace) -> int:
    from fewshot_nsl.report import build_report, find_runs, plot_available, write_new, write_report

    runs, skipped = find_runs(args.run_dirs)
    for path in skipped:
        print(f"report: skipped {path} (not a few-shot run's results)", file=sys.stderr)
    if not runs:
        raise FileNotFoundError(f"report: no few-shot run (results.json) in {args.run_dirs}")
    report = build_report(runs, args.baseline)
    print(report.markdown())
    written = []
    if args.csv:
        written.append(write_new(args.csv, report.csv().encode(), overwrite=args.overwrite))
    if args.out:
        written += write_report(report, args.out, overwrite=args.overwrite)
        if not plot_available():
            print(
                "report: no figures (matplotlib is not installed: pip install 'fewshot-nsl[plot]')",
                file=sys.stderr,
            )
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


# -- parser and entry point --------------------------------------------------------------


def _add_verify_data(parser: argparse.ArgumentParser) -> None:
    """``--verify-data``: how much of a dataset cache ``train``/``eval`` check when loading."""
    parser.add_argument(
        "--verify-data",
        choices=("sampled", "full"),
        default="sampled",
        help="check the dataset cache against the content hashes in its index.json: "
        "'sampled' (64 rows per split, default) or 'full' (every byte)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fewshot-nsl`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fewshot-nsl", description="Few-shot learning with neural similarity learning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="meta-train, validate and test from a config")
    train.add_argument("--config", help="YAML config (see configs/ and docs/cli.md)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides, values parsed as YAML (train.steps=100)",
    )
    existing = train.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last.pt (exact on CPU)"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the run already in the run directory (whole) and start a fresh one",
    )
    train.add_argument(
        "--out", metavar="DIR", help="run directory (default train.out_dir or runs/NAME)"
    )
    train.add_argument(
        "--quiet", action="store_true", help="print only errors, one line per run and the results"
    )
    _add_verify_data(train)
    train.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="train each run once per seed, into OUT/seed-S (= train.seeds=[...]; give it "
        "after the overrides)",
    )
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("eval", help="test a checkpoint (mean ± 95%% CI)")
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="best.pt / last.pt of a train run, or its run directory (then its best.pt)",
    )
    evaluate.add_argument(
        "--shots",
        type=int,
        nargs="+",
        help="shot settings (default: the config's episodes.test_shots)",
    )
    evaluate.add_argument(
        "--episodes",
        type=int,
        help="test episodes per shot (default: the config's episodes.test_episodes)",
    )
    evaluate.add_argument(
        "--query",
        type=int,
        help="queries per class of the test episodes (default: the config's "
        "episodes.test_query; e.g. the shot for MAML's reference protocol, 15 for the common one)",
    )
    evaluate.add_argument(
        "--way",
        type=int,
        help="way of the test episodes (default: episodes.test_way, else episodes.way; "
        "learners without a way-sized head only)",
    )
    evaluate.add_argument(
        "--manifest",
        help="frozen episodes to replay ('{shot}' is replaced; "
        "default: the config's episodes.manifest)",
    )
    evaluate.add_argument(
        "--compare",
        metavar="OTHER",
        help="a second checkpoint (or run directory) scored on the same episodes; reports the "
        "paired difference ± CI",
    )
    evaluate.add_argument(
        "--json",
        help="where to write the results (default: eval_<checkpoint>.json next to the "
        "checkpoint, eval_<checkpoint>-2.json, ... when an earlier eval wrote it)",
    )
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --json FILE (or the default eval_<checkpoint>.json)",
    )
    evaluate.add_argument(
        "--rescore",
        action="store_true",
        help="score again even where the run's results.json holds these episodes' accuracies",
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    _add_verify_data(evaluate)
    evaluate.set_defaults(handler=command_eval)

    prepare = commands.add_parser("prepare-data", help="convert a dataset into a cache folder")
    prepare.add_argument("--dataset", required=True, help="e.g. mini-imagenet, omniglot")
    prepare.add_argument("--source", required=True, help="the downloaded dataset files")
    prepare.add_argument(
        "--out",
        required=True,
        help="cache folder to create (written next to it as a temp folder, renamed when done)",
    )
    prepare.add_argument(
        "--no-strict",
        action="store_true",
        help="accept a subset (skip the published split-size checks)",
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prepare.add_argument("--split-file", help="imagefolder: a file naming each class's split")
    prepare.add_argument("--image-size", type=int, help="resize images to SIZE x SIZE")
    prepare.add_argument(
        "--channels",
        type=lambda v: v if v == "auto" else int(v),
        choices=[1, 3, "auto"],
        help="image channels (default: follow the images; all grayscale -> 1)",
    )
    prepare.add_argument(
        "--protocol",
        choices=["vinyals", "lake", "minimal"],
        help="omniglot: 'vinyals' (full background/evaluation sets) or 'lake'/'minimal' "
        "(small background sets, test = the 20 one-shot runs)",
    )
    prepare.add_argument(
        "--background",
        choices=["small1", "small2", "both"],
        help="omniglot lake protocol: which small background set(s) to train on",
    )
    prepare.add_argument(
        "--val-fraction", type=float, help="omniglot lake protocol: held-out characters"
    )
    prepare.add_argument(
        "--no-rotations", action="store_true", help="omniglot: no rotated copies as classes"
    )
    prepare.set_defaults(handler=command_prepare_data)

    listing = commands.add_parser("list", help="datasets, backbones, learners, configs")
    listing.add_argument(
        "what", nargs="?", choices=("datasets", "backbones", "learners", "configs")
    )
    listing.set_defaults(handler=command_list)

    report = commands.add_parser(
        "report", help="one table (and figures) of every run in folders, seeds grouped"
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders holding runs")
    report.add_argument(
        "--baseline", metavar="NAME", help="paired differences against the runs named NAME"
    )
    report.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    report.add_argument(
        "--out", metavar="DIR", help="write report.md, report.csv and PNG figures in DIR"
    )
    report.add_argument("--overwrite", action="store_true", help="replace existing report files")
    report.set_defaults(handler=command_report)

    register_supervised_cli(commands)  # train-supervised, export (CIFAR experiments)
    return parser


def _stdout_closed() -> int:
    """The reader of stdout went away (``fewshot-nsl list | head -1``): end quietly with the
    status of a command killed by SIGPIPE (141), stdout pointed at /dev/null so that Python's
    flush at exit does not print a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (replaced in-process): nothing to flush
        pass
    finally:
        os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fewshot-nsl``; returns the exit status."""
    from fewshot_nsl.engine import TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        apply_allocator_policy()  # large CPU tensors reuse freed memory (allocator.py)
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except TrainingInterrupted as stop:  # SIGTERM / Ctrl-C: last.pt written after a step
        print(f"fewshot-nsl: {stop}; resume with: {stop.resume_command}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(
            "\nfewshot-nsl: interrupted (resume with: fewshot-nsl train --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130
    except (
        ConfigError,
        CheckpointMismatch,
        FileNotFoundError,
        FileExistsError,
        StorageError,
        ValueError,
    ) as error:
        if os.environ.get("FEWSHOT_NSL_DEBUG"):
            raise
        print(f"fewshot-nsl: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
