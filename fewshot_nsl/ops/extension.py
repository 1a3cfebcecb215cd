"""Building and loading the C++/CUDA extension in ``ops/csrc/`` (once per process).

The extension is prebuilt by ``FEWSHOT_NSL_BUILD_CUDA=1 pip install --no-build-isolation -e .``,
else compiled just in time with ninja and cached under ``~/.cache/fewshot_nsl`` or
``$TORCH_EXTENSIONS_DIR``. A failed build or import warns once per process and never raises
(the custom op then runs its pure-torch implementation); ``FEWSHOT_NSL_DISABLE_CUDA_EXT=1``
skips the extension on purpose (no warning). :func:`binding_arguments` is the one place where
the Python vocabulary (``granularity``) meets the C++ binding's ``per_location`` flag.

See docs/cuda.md for the kernel design and how to check it on a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from fewshot_nsl.ops.geometry import ConvGeometry

__all__ = ["binding_arguments", "cuda_available", "load_extension", "unavailable_reason"]

DISABLE_ENV = "FEWSHOT_NSL_DISABLE_CUDA_EXT"
VERBOSE_ENV = "FEWSHOT_NSL_CUDA_VERBOSE"
EXTENSION_NAME = "fewshot_nsl_bilinear_cuda"
PREBUILT_MODULE = "fewshot_nsl.ops._bilinear_cuda_C"
CSRC_DIR = Path(__file__).resolve().with_name("csrc")
SOURCES = ("bilinear_conv2d.cpp", "bilinear_conv2d_kernels.cu")


# --------------------------------------------------------------------------------------------
# Loading the extension (once per process)
# --------------------------------------------------------------------------------------------
class _LoadState:
    def __init__(self) -> None:
        self.attempted = False
        self.module: ModuleType | None = None
        self.reason: str | None = None


_state = _LoadState()
_lock = threading.Lock()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _build_directory() -> str | None:
    """Cache folder for the JIT build; ``None`` lets torch use ``$TORCH_EXTENSIONS_DIR``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    # One folder per python/torch/CUDA combination: a build is only valid for that ABI.
    tag = "py{}{}_torch{}_cu{}".format(
        sys.version_info.major,
        sys.version_info.minor,
        torch.__version__.split("+")[0],
        (torch.version.cuda or "none").replace(".", ""),
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = cache / "fewshot_nsl" / "torch_extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _import_prebuilt() -> ModuleType | None:
    """The module built ahead of time by setup.py, or ``None`` if it was not built."""
    try:
        return importlib.import_module(PREBUILT_MODULE)
    except ImportError:
        return None


def _jit_build(verbose: bool) -> ModuleType:
    """Compile the extension with ninja (cached; a rebuild happens only when sources change)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("the CUDA toolkit (nvcc) was not found; set CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja was not found; `pip install ninja`")
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(CSRC_DIR / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=_build_directory(),
        verbose=verbose,
    )


def load_extension(verbose: bool | None = None) -> ModuleType | None:
    """The compiled extension module, or ``None`` (then the torch implementation is used).

    Tried once per process. ``None`` without a warning when there is no CUDA device or
    ``FEWSHOT_NSL_DISABLE_CUDA_EXT`` is set; otherwise a failed import/build warns once (the
    message says why) and never raises. ``verbose`` (default: ``$FEWSHOT_NSL_CUDA_VERBOSE``)
    prints the compiler's output.
    """
    with _lock:
        if _state.attempted:
            return _state.module
        _state.attempted = True
        if _env_flag(DISABLE_ENV):
            _state.reason = f"disabled by {DISABLE_ENV}"
            return None
        if not torch.cuda.is_available():
            _state.reason = "no CUDA device"
            return None
        try:
            module = _import_prebuilt()
            if module is None:
                module = _jit_build(_env_flag(VERBOSE_ENV) if verbose is None else verbose)
        except Exception as exc:  # a compiler error, a missing toolkit, a bad ABI ...
            # A compiler error carries the whole build log: keep its end, where the error is.
            message = str(exc).strip()
            message = message if len(message) <= 800 else "..." + message[-800:]
            _state.reason = f"{type(exc).__name__}: {message}"
            warnings.warn(
                f"fewshot_nsl: the CUDA extension for bilinear_conv2d could not be built or "
                f"loaded ({_state.reason}); using the PyTorch implementation instead. "
                f"Set {VERBOSE_ENV}=1 to see the compiler output, {DISABLE_ENV}=1 to silence.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _state.module = module
        return module


def unavailable_reason() -> str | None:
    """Why the extension is not in use (``None`` if it loaded or was never tried)."""
    return _state.reason


def _reset_extension_state() -> None:
    """Forget the load attempt (tests only: the next call tries, and may warn, again)."""
    with _lock:
        _state.__init__()


def cuda_available() -> bool:
    """True iff a CUDA device is present and the compiled extension loads (see
    :func:`load_extension`; never raises, warns at most once per process)."""
    return load_extension() is not None


def binding_arguments(
    geometry: ConvGeometry, granularity: str, diagonal: bool
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """The extension's trailing arguments ``(stride, padding, dilation, per_location,
    diagonal)``: the C++ binding names the granularity by a ``per_location`` bool."""
    if granularity not in ("sample", "location"):
        raise ValueError(
            f"the extension takes granularity 'sample' or 'location', got {granularity!r}"
        )
    stride, padding, dilation = geometry
    return list(stride), list(padding), list(dilation), granularity == "location", bool(diagonal)
