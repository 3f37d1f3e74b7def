"""The CUDA sources compile without a GPU: every .cu with nvcc, the torch binding against torch's headers,
and the packing kernel's own per-element code, built for the host, gives the torch twin's bits; setup.py
refuses a build that cannot work in one line; the built extension (CI builds it against PyPI's CUDA torch)
loads on a CPU and its ops' fake implementations give ops.cpp's shapes and refusals.

Skipped where nvcc (or, for cslt_compress.cu, CUSPARSELT_HOME) is missing, unless
UNIPRUNING_REQUIRE_NVCC=1 (as in CI), which turns those skips into failures; the extension's test is
skipped where it is not built, unless UNIPRUNING_REQUIRE_EXTENSION=1 (CI's extension step).
"""

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from unipruning.kernels.reference import nm_mask

from unipruning.packing import pack_cutlass_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _need(ok: bool, what: str, required_by: str = "UNIPRUNING_REQUIRE_NVCC") -> None:
    if ok:
        return
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{what} (required by {required_by}=1)")
    pytest.skip(what)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    _need(nvcc is not None and os.path.exists(nvcc), "nvcc is not installed")
    return nvcc


def _cusparselt_include() -> list[str]:
    home = os.environ.get("CUSPARSELT_HOME")
    _need(bool(home) and os.path.isfile(os.path.join(home, "include", "cusparseLt.h")),
          "CUSPARSELT_HOME/include/cusparseLt.h not found")
    return ["-I", os.path.join(home, "include")]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("source", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "*.cu"))))
def test_every_cu_file_compiles_with_nvcc(source, tmp_path):
    nvcc = _nvcc()
    extra = _cusparselt_include() if source == "cslt_compress.cu" else []
    _run([nvcc, "-std=c++17", "-c", os.path.join(CSRC, source), "-o", str(tmp_path / "out.o"), *ARCHS, *extra])


def test_torch_binding_compiles_against_torch_headers():
    """ops.cpp without and, where its header is found, with cuSPARSELt; both compiles run at once (each
    parses ATen: about 15 s of one core)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    _need(cxx is not None, "no C++ compiler")
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    _need(os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")), "CUDA headers not found")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-w",
           # the CPU wheel lacks c10's generated CUDA config header; nothing here depends on it
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-I", torch_include, "-I", os.path.join(torch_include, "torch", "csrc", "api", "include"),
           "-I", os.path.join(cuda_home, "include"), "-I", sysconfig.get_paths()["include"],
           os.path.join(CSRC, "ops.cpp")]
    variants = {"without cuSPARSELt": cmd}
    home = os.environ.get("CUSPARSELT_HOME")
    if home and os.path.isfile(os.path.join(home, "include", "cusparseLt.h")):
        variants["with cuSPARSELt"] = [cxx, "-DUNIPRUNING_WITH_CUSPARSELT", "-I", os.path.join(home, "include"),
                                       *cmd[1:]]
    elif os.environ.get("UNIPRUNING_REQUIRE_NVCC") == "1":
        pytest.fail("CUSPARSELT_HOME/include/cusparseLt.h not found (required by UNIPRUNING_REQUIRE_NVCC=1)")
    running = {name: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, c in variants.items()}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {' '.join(variants[name])}\n{out}\n{err}"


@pytest.fixture(scope="module")
def host_packer(tmp_path_factory):
    """pack24.cu built as a host library: its per-element code is the kernel's, run on the CPU."""
    nvcc = _nvcc()
    lib = tmp_path_factory.mktemp("pack24") / "libpack24.so"
    _run([nvcc, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", os.path.join(CSRC, "pack24.cu"), "-o", str(lib),
          "-gencode", "arch=compute_80,code=sm_80"])
    fn = ctypes.CDLL(str(lib)).unipruning_pack24_cutlass_host
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    fn.restype = ctypes.c_int

    def pack(weight, mask):
        rows, cols = weight.shape
        values = torch.empty(rows, cols // 2, dtype=weight.dtype)
        meta = torch.empty(rows, cols // 16, dtype=torch.int16)
        bad = fn(values.data_ptr(), meta.data_ptr(), weight.data_ptr(),
                 mask.data_ptr() if mask is not None else None, rows, cols)
        return values, meta, bad

    return pack


@pytest.mark.skipif(sys.platform != "linux", reason="host library loading is tested on Linux")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 64), (96, 192), (160, 448)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_kernel_code_gives_the_twins_bits(host_packer, shape, dtype, with_mask):
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    w = torch.randn(*shape, generator=g).to(dtype)
    keep = nm_mask(torch.rand(*shape, generator=g), 2, 4)
    if with_mask:
        mask = keep
    else:
        mask = None
        w = torch.where(keep & (torch.rand(*shape, generator=g) > 0.3), w, torch.zeros((), dtype=dtype))
    values, meta, bad = host_packer(w, mask)
    ref_values, ref_meta = pack_cutlass_torch(w, mask)
    assert bad == 0
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))
    assert torch.equal(meta, ref_meta)


def test_kernel_code_flags_what_is_not_24(host_packer):
    dense = torch.ones(32, 64, dtype=torch.float16)
    assert host_packer(dense, None)[2] == 1
    three = torch.zeros(32, 64, dtype=torch.bool)
    three[:, 0::4] = three[:, 1::4] = three[:, 2::4] = True
    assert host_packer(dense, three)[2] == 1


def _setup_py(tmp_path, **env) -> subprocess.CompletedProcess:
    """`python setup.py --name` with the extension requested and `env` on top: what pip runs first."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("UNIPRUNING_", "CUSPARSELT_", "TORCH_CUDA"))}
    cuda = tmp_path / "cuda"
    for part in ("bin/nvcc", "include/cuda_runtime.h"):
        (cuda / part).parent.mkdir(parents=True, exist_ok=True)
        (cuda / part).write_text("")
    (tmp_path / "wrapper" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "wrapper" / "bin" / "nvcc").write_text("")
    full = {**base, "UNIPRUNING_BUILD_CUDA": "1", "CUDA_HOME": str(cuda), **env}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env,needle", [
    ({"CUSPARSELT_HOME": "{tmp}"}, "has no include/cusparseLt.h"),
    ({"UNIPRUNING_CUSPARSELT": "maybe"}, "UNIPRUNING_CUSPARSELT='maybe': expected auto, 0 or 1"),
    ({"UNIPRUNING_CUDA_ARCHS": " ; "}, "names no architecture"),
    ({"CUDA_HOME": "{tmp}/nowhere"}, "needs CUDA_HOME with bin/nvcc"),
    ({"CUDA_HOME": "{tmp}/wrapper"}, "has no include/cuda_runtime.h"),
])
def test_setup_refuses_a_build_that_cannot_work_in_one_line(tmp_path, env, needle):
    done = _setup_py(tmp_path, **{k: v.format(tmp=tmp_path) for k, v in env.items()})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("unipruning: cannot build"), done.stderr


def test_setup_refuses_a_cpu_torch_in_one_line(tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    done = _setup_py(tmp_path, UNIPRUNING_CUSPARSELT="0")
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"unipruning: cannot build unipruning._C: torch {torch.__version__} is a CPU build: install a CUDA build "
        "of torch first, then build with --no-build-isolation (so that the build uses it)"]


@pytest.mark.cuda_ext
def test_the_built_extension_loads_on_a_cpu_and_its_fakes_follow_ops_cpp():
    """The ops trace with fake CUDA tensors (no GPU): the shapes and dtypes ops.cpp allocates, and its refusals."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unipruning.packing.formats import extension

    ext = extension()
    if ext is None:
        _need(False, "unipruning._C is not built (UNIPRUNING_BUILD_CUDA=1)", "UNIPRUNING_REQUIRE_EXTENSION")
    with FakeTensorMode():
        w = torch.empty(64, 128, dtype=torch.bfloat16, device="cuda")
        for mask in (None, torch.empty(64, 128, dtype=torch.bool, device="cuda")):
            values, meta = torch.ops.unipruning.pack24_cutlass(w, mask)
            assert (values.shape, values.dtype, meta.shape, meta.dtype) == ((64, 64), w.dtype, (64, 8), torch.int16)
            assert values.device.type == meta.device.type == "cuda"
        compressed = torch.ops.unipruning.cslt_compress(w.half())
        assert compressed.shape == (64 * 128 * 9 // 16,) and compressed.dtype == torch.float16
        for bad, needle in ((torch.empty(63, 128, dtype=torch.half, device="cuda"), "rows % 32 == 0"),
                            (torch.empty(64, 128, device="cuda"), "float16 or bfloat16")):
            for op in (torch.ops.unipruning.pack24_cutlass, torch.ops.unipruning.cslt_compress):
                with pytest.raises(RuntimeError, match=needle):
                    op(bad, None) if op is torch.ops.unipruning.pack24_cutlass else op(bad)
        with pytest.raises(RuntimeError, match="mask must be bool"):
            torch.ops.unipruning.pack24_cutlass(w, torch.empty(64, 128, device="cuda"))
    assert ext.with_cusparselt in (0, 1)
