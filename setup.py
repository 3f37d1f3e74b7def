"""Only the opt-in CUDA extension lives here; all metadata is in pyproject.toml.

The extension (csrc/, 2:4 packing) is built only with UNIPRUNING_BUILD_CUDA=1 and a CUDA_HOME; otherwise
this file prints one line and builds nothing, without importing torch (an isolated build has none).
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("UNIPRUNING_BUILD_CUDA") == "1" and os.environ.get("CUDA_HOME"):
    raise SystemExit("unipruning: the CUDA extension (csrc/) is not implemented in this version")
else:
    print("unipruning: building without the CUDA extension (set UNIPRUNING_BUILD_CUDA=1 and CUDA_HOME)")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
