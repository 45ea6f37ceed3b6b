"""What can be checked of the CUDA kernels without a GPU: they compile for sm_80, sm_90 and sm_90a with no
register spills under the block shape's register cap, and every multi-tensor kernel (the vector loop
serves aligned and peeled chunks alike) uses 128-bit loads (visible in the SASS)."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import setup as fastamp_setup  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.version.cuda is None or fastamp_setup.find_cuda_home() is None,
                       reason="needs a CUDA build of torch and a CUDA toolkit"),
]

CU_FILES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))


def _cuobjdump():
    candidates = [shutil.which("cuobjdump"), os.path.join(fastamp_setup.find_cuda_home() or "", "bin", "cuobjdump")]
    candidates += glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c)), None)


ARCH_LAYOUTS = [("sm_90", 1), ("sm_90", 0), ("sm_80", 1), ("sm_90a", 1)]


@pytest.mark.parametrize("arch, large_params", ARCH_LAYOUTS,
                         ids=[f"{a}-{'32KB' if p else '4KB'}-params" for a, p in ARCH_LAYOUTS])
@pytest.mark.parametrize("source", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_kernels_compile_without_spills_and_use_128_bit_accesses(source, arch, large_params, tmp_path):
    from torch.utils.cpp_extension import include_paths

    nvcc = os.path.join(fastamp_setup.find_cuda_home(), "bin", "nvcc")
    cubin = tmp_path / "kernels.cubin"
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    command = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-DFASTAMP_LARGE_KERNEL_PARAMS={large_params}",
               f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(cubin), source, *includes]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert spills, result.stderr[-2000:]
    assert all(int(stores) == 0 and int(loads) == 0 for stores, loads in spills), result.stderr
    cuobjdump = _cuobjdump()
    if cuobjdump is None or "multi_tensor_kernel" not in result.stderr:
        return
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)
    for function in functions:
        if "multi_tensor_kernel" in function.split("\n", 1)[0]:
            assert "LDG.E.128" in function, function.split("\n", 1)[0]
