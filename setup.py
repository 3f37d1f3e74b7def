"""Only the opt-in CUDA extension lives here; all metadata is in pyproject.toml.

The extension `unipruning._C` (csrc/: 2:4 packing into the CUTLASS layout, cuSPARSELt compression) is
built only with UNIPRUNING_BUILD_CUDA=1 and a CUDA_HOME; otherwise this file prints one line and builds
nothing, without importing torch (an isolated build has none). Build it against the installed torch:

    UNIPRUNING_BUILD_CUDA=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .

Knobs: UNIPRUNING_CUDA_ARCHS (default "8.0;9.0", the sparse tensor-core GPUs), CUSPARSELT_HOME (a
directory with include/cusparseLt.h and lib/; default: the nvidia-cusparselt wheel that CUDA builds of
torch install; without it the cuSPARSELt op raises and pack_24 falls back to torch._cslt_compress),
MAX_JOBS (ninja's parallelism).
"""

import glob
import importlib.util
import os

from setuptools import setup


def _cusparselt_home():
    """A directory holding include/cusparseLt.h: CUSPARSELT_HOME, or an installed nvidia-cusparselt wheel."""
    if os.environ.get("CUSPARSELT_HOME"):
        return os.environ["CUSPARSELT_HOME"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cusparseLt.h"))):
            return os.path.dirname(os.path.dirname(header))
    return None


def _extension():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("UNIPRUNING_CUDA_ARCHS", "8.0;9.0")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)  # what torch's builder reads
    sources = ["csrc/ops.cpp", "csrc/pack24.cu"]
    macros, include_dirs, library_dirs, libraries, link_args = [], [], [], [], []
    home = _cusparselt_home()
    if home:
        sources.append("csrc/cslt_compress.cu")
        macros.append(("UNIPRUNING_WITH_CUSPARSELT", None))
        include_dirs.append(os.path.join(home, "include"))
        lib = os.path.join(home, "lib")
        library_dirs.append(lib)
        link_args += [f"-Wl,-rpath,{lib}"]
        # the wheel ships only the versioned soname; link it by file name
        found = sorted(glob.glob(os.path.join(lib, "libcusparseLt.so*")))
        link_args += [f"-l:{os.path.basename(found[0])}"] if found else []
        libraries += [] if found else ["cusparseLt"]
        print(f"unipruning: building unipruning._C for {archs} with cuSPARSELt from {home}")
    else:
        print(f"unipruning: building unipruning._C for {archs} without cuSPARSELt (set CUSPARSELT_HOME)")
    ext = CUDAExtension(
        "unipruning._C",
        sources=sources,  # relative to this file, as setuptools wants
        define_macros=macros,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = [], {}
if os.environ.get("UNIPRUNING_BUILD_CUDA") == "1" and os.environ.get("CUDA_HOME"):
    ext_modules, cmdclass = _extension()
else:
    print("unipruning: building without the CUDA extension (set UNIPRUNING_BUILD_CUDA=1 and CUDA_HOME)")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
