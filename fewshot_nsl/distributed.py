"""Data-parallel meta-training on ``torch.distributed`` (launched with ``torchrun``).

Over 400 lines: the process group, its collectives and the trainer that uses them are one
mechanism; the single-process path never imports it.

The meta-batch of ``episodes.tasks_per_batch`` tasks (the *global* batch) is split over the
ranks by :class:`episodes.TaskBatcher`: rank ``r`` of ``W`` takes tasks ``j ≡ r (mod W)`` of
step ``s``, i.e. episodes ``s·T + j``. Episode indices depend on the step and the task slot
only, never on ``W``, so a run resumes with any number of ranks and still sees the episodes
a single process would.

One outer step on every rank (:class:`DistributedMetaTrainer`, on top of
:class:`fewshot_nsl.runner.MetaTrainer`'s seam):

1. each local task's ``loss / T`` is back-propagated on its own (accumulating in ``.grad``);
2. :func:`all_reduce_gradients` sums ``.grad`` over ranks — the meta-batch mean, exactly as one
   process with the whole batch, even when ``T`` is not a multiple of ``W``;
3. :class:`BufferSync` makes the BatchNorm running statistics agree again: float buffers
   become the mean over ranks, counters (``num_batches_tracked``) add up every rank's
   increments; buffers no rank changed stay bit-identical;
4. every rank takes the same optimiser step on the same gradients, so parameters stay equal.

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP arms its reducer in
``DDP.forward`` and syncs from autograd hooks on the parameters. A learner's meta-loss runs
the model through ``torch.func.functional_call`` with fast weights (several inner steps, then
the query pass), never through ``DDP.forward``, so the reducer is never prepared and the
gradients silently stay rank-local (checked: see docs/distributed.md). Making DDP fit would
need a module whose forward is the whole meta-loss, ``no_sync`` around all but the last
task's backward, a W/T loss scale to undo DDP's mean over ranks, and ``broadcast_buffers``
off (it overwrites every rank's BatchNorm statistics with rank 0's). One flat all-reduce
after the outer backward is simpler and exact.

Evaluation shards the frozen episode indices round-robin (:func:`shard_indices`) and gathers
the per-episode accuracies back in index order (:func:`gather_shards`), so means and CIs equal
the single-process ones. Only rank 0 writes files (the runner's ``is_main``).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) nothing here
creates a process group: :func:`init_distributed` returns a one-process context and the plain
:class:`~fewshot_nsl.runner.MetaTrainer` is used, with zero overhead.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fewshot_nsl.engine import resolve_device
from fewshot_nsl.runlog import RunDirError
from fewshot_nsl.runner import MetaTrainer

__all__ = [
    "BufferSync",
    "DistributedContext",
    "DistributedMetaTrainer",
    "all_reduce_gradients",
    "all_reduce_sums",
    "broadcast_object",
    "build_trainer",
    "choose_backend",
    "gather_shards",
    "init_distributed",
    "shard_indices",
    "shutdown",
    "world_from_env",
]

#: Environment variables torchrun sets for every worker.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the training processes.

    ``backend`` is ``None`` when there is no process group (one process): every collective
    helper below is then the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists (``world_size > 1``)."""
        return self.backend is not None


# -- process group ---------------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], key: str) -> int:
    text = environ.get(key)
    if text is None:
        raise ValueError(
            f"environment variable {key} is not set, but WORLD_SIZE is: launch with torchrun "
            f"(which sets {', '.join(ENV_KEYS)}) or unset WORLD_SIZE for one process"
        )
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {key}={text!r} is not an integer") from None


def world_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` without them.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but ``RANK``/``LOCAL_RANK`` are missing, not
            integers, or out of range (the message names the variable).
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return 0, 1, 0
    world_size = _env_int(environ, "WORLD_SIZE")
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    if world_size == 1:
        return 0, 1, 0
    rank, local_rank = _env_int(environ, "RANK"), _env_int(environ, "LOCAL_RANK")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world_size})"
        )
    if local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank} must be >= 0")
    return rank, world_size, local_rank


def choose_backend(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    device: str = "auto", timeout: datetime.timedelta | None = None
) -> DistributedContext:
    """Join the process group torchrun describes in the environment (idempotent).

    Args:
        device: the config's ``train.device`` ("auto", "cpu", "cuda", "cuda:N"). On CUDA each
            process takes GPU ``LOCAL_RANK`` (the ``N`` of "cuda:N" is ignored under torchrun,
            since every process would otherwise pick the same GPU) and the backend is nccl;
            on CPU it is gloo.
        timeout: collective timeout (default: torch's).

    Returns:
        the context; ``backend is None`` (no process group, nothing initialised) when the
        world has one process.
    """
    rank, world_size, local_rank = world_from_env()
    resolved = resolve_device(device)
    if world_size == 1:
        return DistributedContext(device=resolved)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible: use --nproc_per_node <= the number of GPUs"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    backend = choose_backend(resolved)
    if not dist.is_initialized():
        options: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size}
        if timeout is not None:
            options["timeout"] = timeout
        if backend == "nccl":
            options["device_id"] = resolved  # binds the communicator to this GPU eagerly
        dist.init_process_group(**options)
    elif dist.get_backend() != backend:
        raise ValueError(
            f"a {dist.get_backend()} process group already exists but train.device={device!r} "
            f"needs {backend}: use one device type for every run of a multi-run config"
        )
    return DistributedContext(rank, world_size, local_rank, backend, resolved)


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group ``context`` joined (nothing to do for one process).

    Call it on the success path only: it first waits for every rank, because rank 0 hosts the
    rendezvous store, and a rank still tearing down its gloo threads after rank 0 has exited
    aborts ("terminate called without an active exception").
    """
    if context.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- collectives -----------------------------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor over ranks in place, one flat all-reduce per (device, dtype) group.

    Every rank must pass tensors of the same shapes, dtypes and order (they do: the same
    model), so the flat buffers line up element by element.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for members in groups.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in members:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum ``p.grad`` over ranks in place (one flat collective per dtype and device).

    A gradient that is ``None`` on some ranks counts as zeros there; it stays ``None`` only
    when it is ``None`` on every rank, as it would be for one process seeing all the tasks
    (Adam then skips the parameter, as it would single-process). No-op without a process
    group.
    """
    if not _active():
        return
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    has_grad = torch.tensor(
        [p.grad is not None for p in parameters], dtype=torch.float32, device=parameters[0].device
    )
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_sum_([p.grad for p in parameters] + [has_grad])
    for p, seen in zip(parameters, has_grad.tolist()):
        if seen == 0:
            p.grad = None


def all_reduce_sums(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Elementwise sums of ``values`` over ranks (float64); ``list(values)`` for one process."""
    if not _active():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; keep tensors on CPU). Identity alone."""
    if not _active():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of ``indices``: positions ``rank, rank+W, ...`` (round-robin, so
    shares differ by at most one episode)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(indices[rank::world_size])


def gather_shards(local: np.ndarray, total: int, context: DistributedContext) -> np.ndarray:
    """Inverse of :func:`shard_indices`: every rank's ``local`` values, ``(total,)`` float64 in
    the original order. ``local`` is this rank's ``(len(shard),)`` values.

    Uses padded float64 tensors and ``all_gather`` on ``context.device`` (nccl needs GPU
    tensors), so values travel bit-exact.
    """
    local = np.asarray(local, dtype=np.float64)
    expected = len(range(context.rank, total, context.world_size))
    if local.shape != (expected,):
        raise ValueError(
            f"rank {context.rank}: local values have shape {local.shape}, expected ({expected},) "
            f"for {total} items over {context.world_size} ranks"
        )
    if not context.is_distributed:
        return local.copy()
    width = -(-total // context.world_size)  # ceil: the largest share
    padded = torch.zeros(width, dtype=torch.float64, device=context.device)
    padded[: len(local)] = torch.from_numpy(local).to(context.device)
    shares = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(shares, padded)
    result = np.empty(total, dtype=np.float64)
    for rank, share in enumerate(shares):
        count = len(range(rank, total, context.world_size))
        result[rank :: context.world_size] = share[:count].cpu().numpy()
    return result


class BufferSync:
    """Keeps a module's buffers (BatchNorm running statistics) equal on every rank.

    Each rank's training passes move its buffers away from the last agreed values ``b₀``
    (the policy ``bn="running"`` updates them in the outer-loop query passes). :meth:`sync`
    replaces them by ``b₀ + mean_r(b_r − b₀)`` for floating buffers — the average of the ranks'
    running statistics — and ``b₀ + Σ_r(b_r − b₀)`` for integer ones — ``num_batches_tracked``
    then counts every task's pass, as one process would. A buffer no rank touched (every
    buffer under ``bn="transductive"``) stays bit-identical. The average is not bitwise the
    single-process value: one process chains the exponential moving average through all T
    tasks, W ranks each chain T/W of them from the same start.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.agreed = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buffer.detach().clone() for name, buffer in self.module.named_buffers()}

    def sync(self) -> None:
        """Average/accumulate the buffers over ranks (collective); no-op for one process."""
        if not _active():
            return
        world_size = dist.get_world_size()
        buffers = dict(self.module.named_buffers())
        if buffers.keys() != self.agreed.keys():
            raise ValueError(
                f"BufferSync: the module's buffers changed from {sorted(self.agreed)} to "
                f"{sorted(buffers)}; create a new BufferSync after changing the model"
            )
        deltas = []
        for name, buffer in buffers.items():
            delta = buffer.detach() - self.agreed[name]
            if buffer.is_floating_point():
                delta /= world_size
            deltas.append(delta)
        _all_reduce_sum_(deltas)
        with torch.no_grad():
            for (name, buffer), delta in zip(buffers.items(), deltas):
                buffer.copy_(self.agreed[name] + delta)
        self.agreed = self._snapshot()


# -- the distributed trainer -----------------------------------------------------------------


def _to_cpu(value: Any) -> Any:
    """Tensors of a nested state (dicts/lists) moved to CPU, for pickling across ranks."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class DistributedMetaTrainer(MetaTrainer):
    """:class:`~fewshot_nsl.runner.MetaTrainer` over the ranks of a process group.

    Fills the runner's seam: :meth:`reduce_gradients` (all-reduce of meta-gradients and of
    BatchNorm buffers), :meth:`shard`/:meth:`gather` (evaluation), rank-averaged training
    metrics, and rank 0's state (weights, optimiser, schedule, step, best) given to every rank
    after setup — so a resume works even where other nodes cannot read rank 0's ``last.pt``.

    Args:
        config, out_dir, quiet, log, verify_data: as for :class:`MetaTrainer`.
        context: from :func:`init_distributed`; on CUDA the trainer runs on
            ``context.device`` (GPU ``LOCAL_RANK``).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        out_dir: str | Path | None = None,
        *,
        context: DistributedContext,
        quiet: bool = False,
        log: Callable[[str], None] | None = None,
        verify_data: str = "sampled",
    ) -> None:
        super().__init__(
            config,
            out_dir,
            rank=context.rank,
            world_size=context.world_size,
            quiet=quiet,
            log=log,
            verify_data=verify_data,
        )
        self.context = context
        if self.device.type == "cuda":
            self.device = context.device
        if context.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(
                f"train.device={config['train']['device']!r} is not a GPU, but the process "
                "group uses nccl (GPU only): use one device type for every run"
            )
        self.buffer_sync: BufferSync | None = None

    def setup(self, resume: bool = False, overwrite: bool = False) -> None:
        """:meth:`MetaTrainer.setup`, then every rank takes rank 0's state.

        Only rank 0 checks and opens the run directory and reads ``last.pt`` when resuming:
        the others may run on nodes that cannot see rank 0's run directory (or see a stale
        copy of it). When rank 0 refuses (run exists, directory busy, bad checkpoint), every
        rank raises the same one-line error instead of waiting for it forever.
        """
        error: Exception | None = None
        try:
            super().setup(resume=resume and self.is_main, overwrite=overwrite)
        except Exception as raised:
            if not self.is_main:
                raise
            error = raised
        assert self.learner is not None or error is not None
        state = broadcast_object(
            (
                {"error": str(error)}  # the text: not every error type pickles
                if error is not None
                else _to_cpu(
                    {
                        "step": self.step,
                        "best": self.best,
                        "model": self.learner.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                    }
                )
            )
            if self.is_main
            else None
        )
        if "error" in state:
            if error is not None:
                raise error
            raise RunDirError(f"rank 0 stopped: {state['error']}", path=self.out_dir)
        if not self.is_main:
            self.learner.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.best = int(state["step"]), state["best"]
        self.buffer_sync = BufferSync(self.learner)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM / Ctrl-C: all ranks stop after the same step."""
        asked = super().stop_requested()
        if not self.context.is_distributed:
            return asked
        (count,) = all_reduce_sums([float(asked)], self.device)
        if count > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return count > 0

    @property
    def stop_test_at_once(self) -> bool:
        """Alone, like any run; with several ranks the test finishes (every rank leaves its
        collectives) and the run stops after it, without results."""
        return not self.context.is_distributed

    def reduce_gradients(self) -> None:
        """Sum meta-gradients over ranks; bring BatchNorm buffers back into agreement."""
        assert self.learner is not None and self.buffer_sync is not None
        all_reduce_gradients(self.learner.parameters())
        self.buffer_sync.sync()

    def gradient_step(self, step: int) -> dict[str, float]:
        """One outer step's meta-gradients; returns the loss and accuracy averaged over the
        whole meta-batch (all ranks, weighted by each rank's task count)."""
        metrics = super().gradient_step(step)
        count = len(self.batcher.episode_indices(step))
        loss_sum, accuracy_sum, total = all_reduce_sums(
            [metrics["loss"] * count, metrics["accuracy"] * count, count], self.device
        )
        return {"loss": loss_sum / total, "accuracy": accuracy_sum / total}

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's round-robin share of evaluation episode ``indices``."""
        return shard_indices(indices, self.rank, self.world_size)

    def gather(self, local: np.ndarray, indices: list[int]) -> np.ndarray:
        """Every rank's per-episode accuracies, in ``indices`` order."""
        return gather_shards(local, len(indices), self.context)

    def load_best(self) -> None:
        """Rank 0 loads ``best.pt`` and gives its weights to every rank (other nodes may not
        see rank 0's files)."""
        assert self.learner is not None
        if self.is_main:
            super().load_best()
        weights = broadcast_object(_to_cpu(self.learner.state_dict()) if self.is_main else None)
        if not self.is_main:
            self.learner.load_state_dict(weights)


def build_trainer(
    config: Mapping[str, Any],
    out_dir: str | Path | None,
    context: DistributedContext,
    **options: Any,
) -> MetaTrainer:
    """The trainer for ``context``: :class:`DistributedMetaTrainer` in a process group, else
    the plain :class:`MetaTrainer` (no collective at all)."""
    if context.is_distributed:
        return DistributedMetaTrainer(config, out_dir, context=context, **options)
    return MetaTrainer(config, out_dir, **options)
