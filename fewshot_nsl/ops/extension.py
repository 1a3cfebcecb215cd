"""Building and loading the compiled kernels in ``ops/csrc/`` (once per process each).

Two extensions: the CUDA one (``bilinear_conv2d.cpp`` + ``bilinear_conv2d_kernels.cu``, the
per-sample and per-location forms on a GPU) and the CPU one (``location_cpu.cpp``, the
per-location form on the CPU; :func:`load_cpu_extension`, compiled just in time with
``-march=native`` into a folder per kind of CPU; ``FEWSHOT_NSL_DISABLE_CPU_EXT=1`` skips it).

The CUDA extension is prebuilt by
``FEWSHOT_NSL_BUILD_CUDA=1 pip install --no-build-isolation -e .``, else compiled just in
time with ninja and cached under ``~/.cache/fewshot_nsl`` or ``$TORCH_EXTENSIONS_DIR``. A
failed build or import warns once per process and never raises (the custom op then runs its
pure-torch implementation); ``FEWSHOT_NSL_DISABLE_CUDA_EXT=1`` skips the extension on purpose
(no warning). :func:`binding_arguments` is the one place where the Python vocabulary
(``granularity``) meets the C++ binding's ``per_location`` flag.

See docs/cuda.md for the kernel design and how to check it on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from fewshot_nsl.ops.geometry import ConvGeometry

__all__ = [
    "binding_arguments",
    "cpu_kernel_available",
    "cpu_unavailable_reason",
    "cuda_available",
    "load_cpu_extension",
    "load_extension",
    "unavailable_reason",
]

DISABLE_ENV = "FEWSHOT_NSL_DISABLE_CUDA_EXT"
VERBOSE_ENV = "FEWSHOT_NSL_CUDA_VERBOSE"
EXTENSION_NAME = "fewshot_nsl_bilinear_cuda"
PREBUILT_MODULE = "fewshot_nsl.ops._bilinear_cuda_C"
CSRC_DIR = Path(__file__).resolve().with_name("csrc")
SOURCES = ("bilinear_conv2d.cpp", "bilinear_conv2d_kernels.cu")
CPU_DISABLE_ENV = "FEWSHOT_NSL_DISABLE_CPU_EXT"
CPU_EXTENSION_NAME = "fewshot_nsl_location_cpu"
CPU_SOURCES = ("location_cpu.cpp",)


# --------------------------------------------------------------------------------------------
# Loading an extension (once per process)
# --------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewshot_nsl"


def _abi_tag() -> str:
    """One folder per python/torch/CUDA combination: a build is only valid for that ABI."""
    return "py{}{}_torch{}_cu{}".format(
        sys.version_info.major,
        sys.version_info.minor,
        torch.__version__.split("+")[0],
        (torch.version.cuda or "none").replace(".", ""),
    )


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags: the CPU kernel is compiled
    with ``-march=native``, so a cache shared by different machines (an NFS home) keeps one
    build per kind of CPU instead of running one machine's build on another."""
    described = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        described += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(described.encode()).hexdigest()[:10]


def _build_directory(kind: str) -> str | None:
    """Cache folder for a JIT build; ``None`` lets torch use ``$TORCH_EXTENSIONS_DIR``."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    tag = _abi_tag() if kind == "cuda" else f"{_abi_tag()}_cpu{_cpu_tag()}"
    path = _cache_root() / "torch_extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _find_ninja() -> bool:
    """Whether ninja runs; the ``ninja`` package's binary is put on ``PATH`` if needed (a venv
    used without activating it has the binary but not its folder on ``PATH``)."""
    from torch.utils import cpp_extension

    if cpp_extension.is_ninja_available():
        return True
    try:
        import ninja  # the PyPI package, a dependency of fewshot-nsl
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.is_ninja_available()


class _Extension:
    """One compiled extension: its sources, how to check it can run, and its load state."""

    def __init__(
        self,
        kind: str,
        name: str,
        sources: tuple[str, ...],
        disable_env: str,
        prebuilt: str | None,
    ) -> None:
        self.kind = kind  # "cuda" | "cpu"
        self.name = name
        self.sources = sources
        self.disable_env = disable_env
        self.prebuilt = prebuilt
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.attempted = False
        self.module: ModuleType | None = None
        self.reason: str | None = None

    def _import_prebuilt(self) -> ModuleType | None:
        """The module built ahead of time by setup.py, or ``None`` if it was not built."""
        if self.prebuilt is None:
            return None
        try:
            return importlib.import_module(self.prebuilt)
        except ImportError:
            return None

    def _jit_build(self, verbose: bool) -> ModuleType:
        """Compile with ninja (cached; a rebuild happens only when the sources change)."""
        from torch.utils import cpp_extension

        if self.kind == "cuda":
            if torch.version.cuda is None:
                raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA")
            if cpp_extension.CUDA_HOME is None:
                raise RuntimeError("the CUDA toolkit (nvcc) was not found; set CUDA_HOME")
        if not _find_ninja():
            raise RuntimeError("ninja was not found; `pip install ninja`")
        directory = _build_directory(self.kind)
        if self.kind == "cpu" and not verbose:
            built = directory is not None and any(Path(directory).glob(f"{self.name}*.so"))
            if not built:  # the one slow moment of the CPU kernel: say what it is
                print(
                    "fewshot_nsl: compiling the CPU kernel of the per-location bilinear "
                    "convolution (once per machine, about 30 s)...",
                    file=sys.stderr,
                    flush=True,
                )
        cuda_flags = {"extra_cuda_cflags": ["-O3"]} if self.kind == "cuda" else {}
        # CPU: -fopenmp, or at::parallel_for (inline OpenMP in ATen's headers) runs serially.
        return cpp_extension.load(
            name=self.name,
            sources=[str(CSRC_DIR / name) for name in self.sources],
            extra_cflags=["-O3"] if self.kind == "cuda" else ["-O3", "-march=native", "-fopenmp"],
            build_directory=directory,
            verbose=verbose,
            **cuda_flags,
        )

    def load(self, verbose: bool | None) -> ModuleType | None:
        with self.lock:
            if self.attempted:
                return self.module
            self.attempted = True
            if _env_flag(self.disable_env):
                self.reason = f"disabled by {self.disable_env}"
                return None
            if self.kind == "cuda" and not torch.cuda.is_available():
                self.reason = "no CUDA device"
                return None
            try:
                module = self._import_prebuilt()
                if module is None:
                    module = self._jit_build(_env_flag(VERBOSE_ENV) if verbose is None else verbose)
            except Exception as exc:  # a compiler error, a missing toolkit, a bad ABI ...
                # A compiler error carries the whole build log: keep its end, where the error is.
                message = str(exc).strip()
                message = message if len(message) <= 800 else "..." + message[-800:]
                self.reason = f"{type(exc).__name__}: {message}"
                what = "CUDA extension" if self.kind == "cuda" else "CPU kernel"
                warnings.warn(
                    f"fewshot_nsl: the {what} for bilinear_conv2d could not be built or "
                    f"loaded ({self.reason}); using the PyTorch implementation instead. "
                    f"Set {VERBOSE_ENV}=1 to see the compiler output, {self.disable_env}=1 "
                    f"to silence.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
            self.module = module
            return module


_cuda = _Extension("cuda", EXTENSION_NAME, SOURCES, DISABLE_ENV, PREBUILT_MODULE)
_cpu = _Extension("cpu", CPU_EXTENSION_NAME, CPU_SOURCES, CPU_DISABLE_ENV, None)


def load_extension(verbose: bool | None = None) -> ModuleType | None:
    """The compiled CUDA extension module, or ``None`` (then the torch implementation is used).

    Tried once per process. ``None`` without a warning when there is no CUDA device or
    ``FEWSHOT_NSL_DISABLE_CUDA_EXT`` is set; otherwise a failed import/build warns once (the
    message says why) and never raises. ``verbose`` (default: ``$FEWSHOT_NSL_CUDA_VERBOSE``)
    prints the compiler's output.
    """
    return _cuda.load(verbose)


def unavailable_reason() -> str | None:
    """Why the CUDA extension is not in use (``None`` if it loaded or was never tried)."""
    return _cuda.reason


def _reset_extension_state() -> None:
    """Forget the load attempts (tests only: the next call tries, and may warn, again)."""
    _cuda.reset()
    _cpu.reset()


def cuda_available() -> bool:
    """True iff a CUDA device is present and the compiled extension loads (see
    :func:`load_extension`; never raises, warns at most once per process)."""
    return load_extension() is not None


def load_cpu_extension(verbose: bool | None = None) -> ModuleType | None:
    """The compiled CPU kernel of the per-location op (``csrc/location_cpu.cpp``), or ``None``.

    Compiled just in time on first use (ninja and a C++ compiler; about 30 s once per machine,
    said on stderr) and cached like the CUDA build; ``FEWSHOT_NSL_DISABLE_CPU_EXT=1`` skips it
    without a warning; a failed build warns once and never raises (the torch path runs).
    """
    return _cpu.load(verbose)


def cpu_kernel_available() -> bool:
    """True iff the CPU kernel of the per-location op loads (builds it on first call)."""
    return load_cpu_extension() is not None


def cpu_unavailable_reason() -> str | None:
    """Why the CPU kernel is not in use (``None`` if it loaded or was never tried)."""
    return _cpu.reason


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
