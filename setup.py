"""Builds rose_kernels._C: the op family (schemas, argument checks), the CPU kernels compiled once per
CPU capability and, when the installed torch is a CUDA build and nvcc is found, the CUDA kernels.

The CPU kernels are compiled three times (baseline x86-64, AVX2+FMA, AVX-512) from one source and
the fastest variant the running CPU supports is picked at load time, the way ATen's DispatchStub
does it. A portable wheel therefore still runs 8- or 16-lane code; `ROSE_KERNELS_MARCH_NATIVE=1`
additionally adds `-march=native` everywhere (a non-portable local build).

The CUDA kernels (csrc/cuda) are built for the architectures in TORCH_CUDA_ARCH_LIST (default
"8.0;9.0") with the nvcc of CUDA_HOME; ROSE_KERNELS_CUDA=0 builds the CPU-only extension anyway,
ROSE_KERNELS_CUDA=1 fails when the CUDA build is not possible. ROSE_KERNELS_PTXAS_VERBOSE=1 makes
ptxas report registers and spills per kernel (`make cuda-check` collects them).

Build with `pip install --no-build-isolation .` against the torch already installed.
"""

import concurrent.futures
import glob
import os
import platform
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")

# One translation unit per capability; each defines the kernels inside its own namespace
# (CPU_CAPABILITY), so the three copies never collide at link time.
CAPABILITY_FLAGS = {
    "kernels_default.cpp": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "kernels_avx2.cpp": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.cpp": [
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    ],
}


def capability_sources():
    names = ["kernels_default.cpp"] + (["kernels_avx2.cpp", "kernels_avx512.cpp"] if IS_X86 else [])
    return [os.path.join("csrc", "cpu", n) for n in names]


class BuildWithCapabilityFlags(BuildExtension):
    """BuildExtension cannot give one source file its own flags; wrap its compile step to do so."""

    def build_extension(self, ext):
        wrapped = self.compiler._compile

        def compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
            extra = CAPABILITY_FLAGS.get(os.path.basename(src), [])
            if extra:
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": list(extra_postargs["cxx"]) + extra}
                else:
                    extra_postargs = list(extra_postargs) + extra
            return wrapped(obj, src, ext_name, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        self.compiler.compile = parallel_compile(self.compiler)
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = wrapped
            del self.compiler.compile


def parallel_compile(compiler):
    """distutils' CCompiler.compile, with the sources compiled side by side (MAX_JOBS or every CPU):
    without ninja (see below) each source would wait for the one before it."""

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        jobs = [(obj, *build[obj]) for obj in objects if obj in build]
        workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for done in [pool.submit(compiler._compile, obj, src, ext, cc_args, extra_postargs, pp_opts)
                         for obj, src, ext in jobs]:
                done.result()
        return objects

    return compile


def cuda_build_reason() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (printed by the build)."""
    wanted = os.environ.get("ROSE_KERNELS_CUDA", "auto")
    if wanted == "0":
        return False, "ROSE_KERNELS_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        reason = "nvcc not found (set CUDA_HOME)"
    else:
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc in {CUDA_HOME}"
    if wanted == "1":
        raise RuntimeError(f"ROSE_KERNELS_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def nvidia_include_dirs() -> list[str]:
    """The nvidia-* wheels' headers (cuBLAS, cuSPARSE, ...), which ATen's CUDA headers include when
    the toolkit in CUDA_HOME has only the runtime."""
    found = []
    for entry in torch.__path__:
        found += glob.glob(os.path.join(os.path.dirname(entry), "nvidia", "*", "include"))
    return sorted(set(found))


def extensions():
    # -ffp-contract=off: no silent a*b+c fusion, so that thresholds, scores and updates round
    # exactly as the reference does on every capability (explicit at::vec::fmadd stays fused).
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
           "-Wno-maybe-uninitialized"]  # false positives inside GCC 12's AVX-512 conversion intrinsics
    if os.environ.get("ROSE_KERNELS_MARCH_NATIVE") == "1":
        cxx.append("-march=native")
    if os.environ.get("DEBUG") == "1":
        cxx = [f for f in cxx if f != "-O3"] + ["-O0", "-g"]
    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "cpu", "dispatch.cpp")]
    sources += capability_sources()
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "cpu", "*.h")))
    with_cuda, reason = cuda_build_reason()
    print(f"rose_kernels: building the {'CPU and CUDA' if with_cuda else 'CPU-only'} extension ({reason})")
    if not with_cuda:
        return [CppExtension("rose_kernels._C", sources, depends=headers, include_dirs=[os.path.join(HERE, "csrc")],
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # -fmad=false: no contraction, as -ffp-contract=off on the CPU, so both round every operation
    # of rose_math.h alike (nvcc's default IEEE division and square root are kept: no fast math).
    nvcc = ["-O3", "-fmad=false", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("ROSE_KERNELS_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    headers += sorted(glob.glob(os.path.join("csrc", "cuda", "*.h")) + glob.glob(os.path.join("csrc", "cuda", "*.cuh")))
    return [
        CUDAExtension(
            "rose_kernels._C",
            sources,
            depends=headers,
            include_dirs=[os.path.join(HERE, "csrc"), *nvidia_include_dirs()],
            define_macros=[("ROSE_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


# ROSE_KERNELS_NO_EXTENSION=1: the package alone (an editable install for the console scripts); the
# Makefile then builds the extension in place with `setup.py build_ext --inplace`, once. (An
# editable install would compile it in a temporary directory, and build_ext, finding no build/,
# would compile it a second time.)
setup(
    ext_modules=[] if os.environ.get("ROSE_KERNELS_NO_EXTENSION") == "1" else extensions(),
    # Ninja writes one flag set for all files; the per-capability flags need the plain compiler.
    cmdclass={"build_ext": BuildWithCapabilityFlags.with_options(use_ninja=False)},
)
