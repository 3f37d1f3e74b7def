"""What importing the package costs (after torchao's test_lean_import): every CLI call pays it.

`import unipruning` imports neither torch, transformers nor triton and starts no CUDA context; the public
names import their modules when first used. `unipruning --help` and `unipruning COMMAND --help` import no
torch at all. Each check runs in a fresh interpreter (this process has long imported everything). The
import time itself is measured by benchmarks/bench_import.py (a timed unit test would be noise here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "triton", "datasets", "accelerate", "safetensors", "numpy")


def _imported_after(code: str) -> dict:
    """{"modules": the HEAVY modules imported, "cuda": whether torch started a CUDA context} after `code`."""
    probe = (f"import sys, json\n{code}\n"
             f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
             "cuda = 'torch' in sys.modules and sys.modules['torch'].cuda.is_initialized()\n"
             "print(json.dumps({'modules': heavy, 'cuda': cuda}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_unipruning_is_lean():
    found = _imported_after("import unipruning\nassert 'prune' in dir(unipruning)")
    assert found == {"modules": [], "cuda": False}


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["mask", "--help"], ["eval", "--help"], []])
def test_cli_help_imports_no_torch(argv):
    code = ("from unipruning.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert _imported_after(code) == {"modules": [], "cuda": False}


def test_a_public_name_imports_its_module_without_cuda():
    found = _imported_after("from unipruning import prune, PruneConfig, Saliency")
    assert "torch" in found["modules"] and "triton" not in found["modules"]
    assert "transformers" not in found["modules"] and not found["cuda"]


def test_unknown_names_are_attribute_errors():
    import unipruning

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        unipruning.nothing  # noqa: B018
    assert unipruning.progress.Progress is not None  # a submodule, imported on first use


@pytest.mark.parametrize("where", ["", "tests"])
def test_the_clone_s_kernels_directory_does_not_shadow_hugging_face_kernels(where):
    """Run from the clone's root (`python -m`, a script beside the README), the repository root is on sys.path
    and `kernels/` is importable as bare `kernels`, the name of Hugging Face's package that transformers >= 5.25
    imports: ours steps aside for the installed distribution, or says it is absent. A script in tests/ (torchrun
    starts tests/torchrun_jobs.py) puts tests/ first: no `kernels` there (the twins' tests live in
    tests/kernel_twins/; a tests/kernels/ package broke every torchrun test under transformers 5.25)."""
    import importlib.metadata
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "else:\n    print(kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(root, where)], capture_output=True, text=True,
                         timeout=300, check=True)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert out.stdout.strip() == "absent"
    else:
        ours = (os.path.join(root, "kernels"), os.path.join(root, "tests"))
        assert not out.stdout.strip().startswith(ours), out.stdout
        assert out.stdout.strip().endswith("__init__.py")
