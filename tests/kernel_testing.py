"""Helpers shared by the Triton kernel tests (``test_kernel_*.py``).

Without CUDA the kernels run on CPU tensors under the interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INT_POISON = -7
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}

# (kernel name, {argument: Triton type}, {constexpr argument: value})
CompileJob = tuple[str, dict[str, str], dict[str, Any]]

COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module = importlib.import_module(sys.argv[1])
for name, signature, constexprs in json.loads(sys.argv[2]):
    fn = getattr(module, name)
    types = {**signature, **{arg: "constexpr" for arg in constexprs}}
    source = ASTSource(fn=fn, signature={arg: types[arg] for arg in fn.arg_names}, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
"""


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded per test (and per parameter set): fresh, reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error ``max|got - want| / max|want|`` in float64."""
    want = want.detach().double()
    scale = want.abs().max().clamp_min(1e-30)
    return float((got.detach().double() - want).abs().max() / scale)


def assert_compiles_for_sm90(module: str, jobs: list[CompileJob], cache_dir: Path) -> None:
    """The interpreter accepts code the compiler rejects: compile (no GPU needed, ptxas
    ships with triton) each job's kernel from ``module`` for sm_90, in a process without
    TRITON_INTERPRET, with its Triton cache in ``cache_dir``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, module, json.dumps(jobs)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
