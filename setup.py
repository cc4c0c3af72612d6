"""Builds rose_kernels._C: the op schema plus the CPU kernels, compiled once per CPU capability.

The CPU kernels are compiled three times (baseline x86-64, AVX2+FMA, AVX-512) from one source and
the fastest variant the running CPU supports is picked at load time, the way ATen's DispatchStub
does it. A portable wheel therefore still runs 8- or 16-lane code; `ROSE_KERNELS_MARCH_NATIVE=1`
additionally adds `-march=native` everywhere (a non-portable local build).

Build with `pip install --no-build-isolation .` against the torch already installed.
"""

import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

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
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = wrapped


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
    headers = [os.path.join("csrc", "common.h"), os.path.join("csrc", "cpu", "dispatch.h"),
               os.path.join("csrc", "cpu", "kernels.h")]
    return [
        CppExtension(
            "rose_kernels._C",
            sources,
            depends=headers,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
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
