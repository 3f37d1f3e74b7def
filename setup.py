"""Only the opt-in CUDA extension lives here; all metadata is in pyproject.toml.

The extension `unipruning._C` (csrc/: 2:4 packing into the CUTLASS layout, cuSPARSELt compression) is
built only with UNIPRUNING_BUILD_CUDA=1 and a CUDA_HOME; otherwise this file prints one line and builds
nothing, without importing torch (an isolated build has none). Build it against the installed CUDA torch:

    UNIPRUNING_BUILD_CUDA=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ".[cuda]"

Knobs: UNIPRUNING_CUDA_ARCHS (default "8.0;9.0", the sparse tensor-core GPUs; the last one also as PTX, so
that newer GPUs can load it), UNIPRUNING_CUSPARSELT (auto, the default: with cuSPARSELt when its header is
found; 0: without it, and the cslt_compress op refuses in one line; 1: with it or fail), CUSPARSELT_HOME (a
directory with include/cusparseLt.h and lib/; default: the nvidia-cusparselt wheel that CUDA builds of
torch install), MAX_JOBS (ninja's parallelism). Headers a toolkit with only nvcc lacks (cuSPARSELt's header
includes cusparse.h) are taken from the nvidia wheels of the CUDA torch (nvidia/cu13/include, or
nvidia/cusparse/include for CUDA 12). A setting that cannot work stops the build with one line.
"""

import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> None:
    raise SystemExit(f"unipruning: cannot build unipruning._C: {message}")


def _nvidia_roots() -> list[str]:
    """The directories of the `nvidia` namespace package (the CUDA wheels that PyPI's torch depends on)."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec else []


def _wheel_header(name: str) -> str | None:
    """A header of the nvidia wheels: nvidia/cu13/include (CUDA 13) or nvidia/<library>/include (CUDA 12)."""
    for root in _nvidia_roots():
        found = sorted(glob.glob(os.path.join(root, "*", "include", name)))
        if found:
            return found[0]
    return None


def _cusparselt_home() -> str | None:
    """The cuSPARSELt to build with (a directory holding include/cusparseLt.h), or None to build without."""
    choice = os.environ.get("UNIPRUNING_CUSPARSELT", "auto")
    if choice not in ("auto", "0", "1"):
        _fail(f"UNIPRUNING_CUSPARSELT={choice!r}: expected auto, 0 or 1")
    if choice == "0":
        return None
    home = os.environ.get("CUSPARSELT_HOME")
    if home:
        if not os.path.isfile(os.path.join(home, "include", "cusparseLt.h")):
            _fail(f"CUSPARSELT_HOME={home} has no include/cusparseLt.h: point it at a cuSPARSELt install, or "
                  "build without it (UNIPRUNING_CUSPARSELT=0)")
        return home
    header = _wheel_header("cusparseLt.h")
    if header is None and choice == "1":
        _fail("UNIPRUNING_CUSPARSELT=1 but no cusparseLt.h: set CUSPARSELT_HOME or install nvidia-cusparselt")
    return os.path.dirname(os.path.dirname(header)) if header else None


def _extra_headers(cuda_home: str, names: list[str]) -> list[str]:
    """An include directory with links to the headers among `names` that CUDA_HOME/include lacks, taken from
    the nvidia wheels; only those, so that the toolkit's own headers stay the ones used."""
    missing = [n for n in names if not os.path.isfile(os.path.join(cuda_home, "include", n))]
    if not missing:
        return []
    linked = os.path.join(HERE, "build", "cuda-wheel-headers")
    os.makedirs(linked, exist_ok=True)
    for name in missing:
        source = _wheel_header(name)
        if source is None:
            _fail(f"{name} is in neither {cuda_home}/include nor an installed nvidia wheel (PyPI's CUDA torch "
                  "brings it); install the toolkit's headers, or build without cuSPARSELt (UNIPRUNING_CUSPARSELT=0)")
        target = os.path.join(linked, name)
        if os.path.lexists(target):
            os.remove(target)
        os.symlink(source, target)
    return [linked]


def _arch_list(archs: str) -> str:
    """TORCH_CUDA_ARCH_LIST for `archs` with PTX of the highest (so a newer GPU JIT-compiles it)."""
    parts = [a.strip() for a in archs.split(";") if a.strip()]
    if not parts:
        _fail(f"UNIPRUNING_CUDA_ARCHS={archs!r} names no architecture (e.g. 8.0;9.0)")
    if not any(p.endswith("+PTX") for p in parts):
        parts[-1] += "+PTX"
    return ";".join(parts)


def _check_torch() -> None:
    import torch

    if torch.version.cuda is None:
        _fail(f"torch {torch.__version__} is a CPU build: install a CUDA build of torch first, then build with "
              "--no-build-isolation (so that the build uses it)")


def _cusparselt_args(home: str) -> dict:
    lib = os.path.join(home, "lib")
    found = sorted(glob.glob(os.path.join(lib, "libcusparseLt.so*")))
    # the wheel ships only the versioned soname; link it by file name
    link = [f"-Wl,-rpath,{lib}"] + ([f"-l:{os.path.basename(found[0])}"] if found else [])
    return {"include_dirs": [os.path.join(home, "include")], "library_dirs": [lib],
            "libraries": [] if found else ["cusparseLt"], "extra_link_args": link}


def _extension(cuda_home: str):
    archs = _arch_list(os.environ.get("UNIPRUNING_CUDA_ARCHS", "8.0;9.0"))
    home = _cusparselt_home()  # the settings are checked before torch is imported
    _check_torch()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)  # what torch's builder reads
    sources = ["csrc/ops.cpp", "csrc/pack24.cu"]
    args = {"include_dirs": [], "library_dirs": [], "libraries": [], "extra_link_args": []}
    macros = []
    if home:
        sources.append("csrc/cslt_compress.cu")
        macros.append(("UNIPRUNING_WITH_CUSPARSELT", None))
        args = _cusparselt_args(home)
        args["include_dirs"] += _extra_headers(cuda_home, ["cusparse.h"])
        print(f"unipruning: building unipruning._C for {os.environ['TORCH_CUDA_ARCH_LIST']} with cuSPARSELt "
              f"from {home}")
    else:
        print(f"unipruning: building unipruning._C for {os.environ['TORCH_CUDA_ARCH_LIST']} without cuSPARSELt "
              "(its cslt_compress op refuses; pack_24 uses torch._cslt_compress)")
    ext = CUDAExtension(
        "unipruning._C",
        sources=sources,  # relative to this file, as setuptools wants
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        **args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = [], {}
if os.environ.get("UNIPRUNING_BUILD_CUDA") == "1":
    cuda = os.environ.get("CUDA_HOME")
    if not cuda or not os.path.isfile(os.path.join(cuda, "bin", "nvcc")):
        _fail(f"UNIPRUNING_BUILD_CUDA=1 needs CUDA_HOME with bin/nvcc (CUDA_HOME={cuda or 'unset'})")
    if not os.path.isfile(os.path.join(cuda, "include", "cuda_runtime.h")):
        _fail(f"CUDA_HOME={cuda} has no include/cuda_runtime.h: point it at the toolkit (e.g. /usr/local/cuda), not "
              "at a directory that only holds an nvcc wrapper")
    ext_modules, cmdclass = _extension(cuda)
else:
    print("unipruning: building without the CUDA extension (set UNIPRUNING_BUILD_CUDA=1 and CUDA_HOME)")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
