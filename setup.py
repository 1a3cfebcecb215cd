"""Packaging lives in setup.cfg; this file only adds the optional ahead-of-time CUDA build.

    pip install -e .                                                  # pure Python (default)
    FEWSHOT_NSL_BUILD_CUDA=1 pip install --no-build-isolation -e .    # + compiled extension

The CUDA build needs torch (with CUDA) and nvcc in the *build* environment, hence
``--no-build-isolation``. Without the variable nothing here imports torch. Without an
ahead-of-time build the extension is compiled just in time on first use (docs/cuda.md).
"""

import os

from setuptools import setup

CSRC = "fewshot_nsl/ops/csrc"


def cuda_extension_options() -> dict:
    if os.environ.get("FEWSHOT_NSL_BUILD_CUDA", "0").strip() in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "FEWSHOT_NSL_BUILD_CUDA=1 needs torch in the build environment: install torch "
            "first, then run `FEWSHOT_NSL_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
        ) from exc
    extension = CUDAExtension(
        name="fewshot_nsl.ops._bilinear_cuda_C",  # the module fewshot_nsl.ops.extension imports
        sources=[f"{CSRC}/bilinear_conv2d.cpp", f"{CSRC}/bilinear_conv2d_kernels.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_options())
