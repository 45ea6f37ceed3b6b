"""Installing and loading fastamp as users do: the build record, the JIT cache, the fallback warning,
the arch list, and (slow) a fresh venv with an isolated ``pip install`` of a clean clone."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import fastamp
from fastamp import _build

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = ("import json, warnings, fastamp; i = fastamp.build_info();"
         "print('INFO' + json.dumps({k: i[k] for k in ('kernels', 'extension_path', 'cpu_kernels', "
         "'compiled_on_this_import', 'extension_error')}))")


def _probe(python: str, env: dict, cwd: pathlib.Path) -> tuple:
    out = subprocess.run([python, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    info = json.loads(next(line[4:] for line in out.stdout.splitlines() if line.startswith("INFO")))
    return info, out.stderr


def _package_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """fastamp's Python files and sources in a folder of their own, without the in-place build."""
    shutil.copytree(ROOT / "fastamp", tmp_path / "fastamp", ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    return tmp_path


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAMP_")}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


# ---- pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("7.5;8.0;8.6;8.9;9.0+PTX", ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"]),
    ("9.0a 10.0a", ["9.0a", "10.0a"]),
    ("8.0,9.0", ["8.0", "9.0"]),
    ("Hopper", ["9.0+PTX"]),
    ("Ampere;Hopper", ["8.0", "8.6+PTX", "9.0+PTX"]),
    ("", []),
])
def test_arch_list_is_parsed_as_torch_reads_it(spec, expected):
    assert _build.parse_arch_list(spec) == expected


@pytest.mark.parametrize("spec", ["sm_90", "9", "Hoper", "9.0+ptx"])
def test_bad_arch_entries_are_named(spec):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST entry"):
        _build.parse_arch_list(spec)


def test_large_kernel_params_follow_the_lowest_arch_and_nvcc():
    assert _build.Toolchain("x", "13.0", "/cuda", (13, 0), ("9.0a", "8.0")).large_kernel_params
    assert not _build.Toolchain("x", "13.0", "/cuda", (13, 0), ("6.1", "9.0")).large_kernel_params
    assert not _build.Toolchain("x", "12.0", "/cuda", (12, 0), ("9.0",)).large_kernel_params


@pytest.mark.parametrize("compiled, needed, covers", [
    (["9.0"], ["9.0"], True),
    (["8.0", "9.0a"], ["9.0"], True),
    (["8.0+PTX"], ["9.0"], True),
    (["9.0"], ["8.0"], False),
    (["9.0+PTX"], ["8.6"], False),
    (["8.0"], ["8.0", "9.0"], False),
    ([], ["9.0"], False),
])
def test_cuda_arch_coverage(compiled, needed, covers):
    assert _build.cuda_archs_cover(compiled, needed) is covers


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTAMP_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert _build.cache_root() == tmp_path / "ext" / "fastamp"
    monkeypatch.setenv("FASTAMP_CACHE_DIR", str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"


def test_source_hash_changes_with_any_source(tmp_path):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    before = _build.source_hash(tmp_path / "csrc")
    assert before == _build.source_hash(ROOT / "csrc")
    (tmp_path / "csrc" / "cpu" / "scale.cpp").write_text((tmp_path / "csrc" / "cpu" / "scale.cpp").read_text() + "\n")
    assert _build.source_hash(tmp_path / "csrc") != before


def test_the_loaded_module_carries_its_build_record():
    info = fastamp.build_info()
    if not info["extension_loaded"]:
        pytest.skip(f"no compiled kernels here: {info['extension_error']}")
    record = _build.build_record(info["extension_path"])
    assert record["torch"] == torch.__version__ == info["compiled_torch_version"]
    assert record["source"] == _build.source_hash(_build.source_dir())


# ---- the loader, in fresh processes (no compiling) ------------------------------------------------


def _loaded_library() -> pathlib.Path:
    info = fastamp.build_info()
    if not info["extension_loaded"]:
        pytest.skip(f"no compiled kernels here: {info['extension_error']}")
    return pathlib.Path(info["extension_path"])


def _with_torch_version(library: pathlib.Path, target: pathlib.Path, version: str) -> None:
    """A copy of a build whose record claims another torch (same length, so the binary stays valid)."""
    data = library.read_bytes()
    old = f"torch={torch.__version__};".encode()
    new = f"torch={version};".encode()
    assert len(old) == len(new) and data.count(old) == 1
    target.write_bytes(data.replace(old, new))


def _cache_entry(cache: pathlib.Path, library: pathlib.Path) -> pathlib.Path:
    record = _build.build_record(str(library))
    slot = _build.cache_slot(record["source"], torch.__version__, torch.version.cuda).name
    folder = cache / slot / "cpu"
    folder.mkdir(parents=True)
    shutil.copy(library, folder / ("fastamp_C" + library.suffix))
    (folder / "build.json").write_text(json.dumps({"torch": torch.__version__}))
    return folder


def test_a_build_for_another_torch_is_never_loaded_and_the_fallback_warns(tmp_path):
    library = _loaded_library()
    package = _package_copy(tmp_path / "pkg")
    other = "9" * (len(torch.__version__))
    _with_torch_version(library, package / "fastamp" / library.name, other)
    info, stderr = _probe(sys.executable, _env(FASTAMP_JIT="0", FASTAMP_CACHE_DIR=str(tmp_path / "cache")), package)
    assert info["kernels"] == "reference" and not info["cpu_kernels"]
    assert f"was built for torch {other}" in info["extension_error"]
    assert "KernelFallbackWarning" in stderr and "FASTAMP_JIT=0 forbids compiling" in stderr
    assert stderr.count("KernelFallbackWarning") == 1


def test_a_cached_build_is_used_without_compiling_and_a_stale_one_is_skipped(tmp_path):
    library = _loaded_library()
    package = _package_copy(tmp_path / "pkg")
    cache = tmp_path / "cache"
    folder = _cache_entry(cache, library)
    env = _env(FASTAMP_JIT="0", FASTAMP_CACHE_DIR=str(cache))
    info, stderr = _probe(sys.executable, env, package)
    assert info["kernels"] == "jit" and info["cpu_kernels"] and not info["compiled_on_this_import"]
    assert pathlib.Path(info["extension_path"]).parent == folder
    assert "compiling" not in stderr and "KernelFallbackWarning" not in stderr
    # The same entry claiming another torch is passed over.
    entry = folder / ("fastamp_C" + library.suffix)
    _with_torch_version(library, entry, "9" * len(torch.__version__))
    info, stderr = _probe(sys.executable, env, package)
    assert info["kernels"] == "reference" and "KernelFallbackWarning" in stderr


def test_disabled_extension_runs_the_reference_without_a_warning(tmp_path):
    info, stderr = _probe(sys.executable, _env(FASTAMP_DISABLE_EXTENSION="1"), ROOT)
    assert info["kernels"] == "reference" and "KernelFallbackWarning" not in stderr


def test_lock_lets_one_process_in_at_a_time(tmp_path):
    """The cache lock excludes a second holder until the first leaves (threads stand in for processes:
    flock locks belong to open files, so two opens exclude each other)."""
    lock = tmp_path / "x.lock"
    events = []
    with _build._exclusive(lock, None):
        def second():
            with _build._exclusive(lock, None):
                events.append("second")

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.5)
        events.append("first done")
    waiter.join(5)
    assert events == ["first done", "second"]


# ---- compiling (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_compile_error_shows_the_compilers_message(tmp_path):
    package = _package_copy(tmp_path / "pkg")
    module_cpp = package / "csrc" / "module.cpp"
    module_cpp.write_text(module_cpp.read_text() + "\nint fastamp_broken = undeclared_thing_here;\n")
    info, stderr = _probe(sys.executable, _env(FASTAMP_CACHE_DIR=str(tmp_path / "cache"), MAX_JOBS="2"), package)
    assert info["kernels"] == "reference"
    assert "undeclared_thing_here" in info["extension_error"] and "error" in info["extension_error"]
    assert "module.cpp" in info["extension_error"] and "Traceback" not in info["extension_error"]
    assert "KernelFallbackWarning" in stderr and "compiling kernels for torch" in stderr
    # A second process (a rank that queued behind the first) does not compile the same failure again.
    info, stderr = _probe(sys.executable, _env(FASTAMP_CACHE_DIR=str(tmp_path / "cache"), MAX_JOBS="2"), package)
    assert info["kernels"] == "reference" and "undeclared_thing_here" in info["extension_error"]
    assert "compiling kernels for torch" not in stderr and "`fastamp build` retries" in info["extension_error"]


def _venv_with_torch(where: pathlib.Path) -> pathlib.Path:
    """A fresh venv holding torch, as a user's environment would: FASTAMP_TEST_TORCH_SPEC, by default
    the CPU build torch==2.13.0 (small, and another torch than `make test` builds against)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    spec = os.environ.get("FASTAMP_TEST_TORCH_SPEC", "torch==2.13.0")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", spec, "numpy", "ninja"],
                   check=True, timeout=1800)
    return python


def _clean_clone(where: pathlib.Path) -> pathlib.Path:
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    else:
        shutil.copytree(ROOT, where, ignore=shutil.ignore_patterns(".venv*", "*.so", "build", "__pycache__"))
    return where


@pytest.mark.slow
def test_isolated_pip_install_compiles_on_first_use_once_across_concurrent_processes(tmp_path):
    """As a user installs: a venv that has torch, `pip install <clean clone>` (isolated), then two
    processes importing at once on a cold cache, a third after them, and FASTAMP_JIT=0."""
    python = _venv_with_torch(tmp_path / "venv")
    clone = _clean_clone(tmp_path / "clone")
    def torch_installed() -> list:
        shown = subprocess.run([str(python), "-m", "pip", "show", "torch"], capture_output=True, text=True).stdout
        return [line for line in shown.splitlines() if line.startswith(("Version:", "Location:"))]

    torch_before = torch_installed()
    install = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", str(clone)],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Collecting torch" not in install.stdout and "Downloading torch" not in install.stdout
    assert torch_installed() == torch_before
    site = subprocess.run([str(python), "-c", "import fastamp, os; print(os.path.dirname(fastamp.__file__))"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(FASTAMP_DISABLE_EXTENSION="1"))
    installed = pathlib.Path(site.stdout.strip())
    assert not list(installed.glob("_C*.so")) and (installed / "_csrc" / "module.cpp").is_file()

    cache = tmp_path / "cache"
    env = _env(FASTAMP_CACHE_DIR=str(cache), MAX_JOBS="2")
    processes = [subprocess.Popen([str(python), "-c", PROBE], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    infos = [json.loads(next(line[4:] for line in out.splitlines() if line.startswith("INFO"))) for out, _ in outputs]
    stderr = "".join(err for _, err in outputs)
    assert all(i["kernels"] == "jit" and i["cpu_kernels"] for i in infos), infos
    assert stderr.count("fastamp: compiling kernels for torch") == 1, stderr
    assert sum(i["compiled_on_this_import"] for i in infos) == 1
    assert "KernelFallbackWarning" not in stderr
    assert len({i["extension_path"] for i in infos}) == 1
    assert not [p for p in cache.rglob(".staging-*")]

    info, stderr = _probe(str(python), env, tmp_path)
    assert info["kernels"] == "jit" and not info["compiled_on_this_import"] and "compiling" not in stderr

    check = subprocess.run([str(python), "-m", "fastamp.cli", "check", "--device", "cpu"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 failed" in check.stdout and "kernels: jit" in check.stdout

    info, stderr = _probe(str(python), _env(FASTAMP_CACHE_DIR=str(tmp_path / "empty"), FASTAMP_JIT="0"), tmp_path)
    assert info["kernels"] == "reference" and "KernelFallbackWarning" in stderr and "FASTAMP_JIT=0" in stderr

    # The other isolated installs users type: editable, and from a git URL; both find the same sources,
    # so the build in the cache is reused.
    others = [["-e", str(clone)]] + ([[f"git+file://{clone}"]] if (clone / ".git").exists() else [])
    for spec in others:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-qy", "fastamp"], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *spec],
                                 capture_output=True, text=True, timeout=1800)
        assert install.returncode == 0, install.stdout + install.stderr
        assert "Collecting torch" not in install.stdout and torch_installed() == torch_before
        info, stderr = _probe(str(python), env, tmp_path)
        assert info["kernels"] == "jit" and not info["compiled_on_this_import"], (spec, info, stderr)


@pytest.mark.slow
def test_fastamp_build_fills_the_cache_for_jit_0_and_gpu_check_without_a_gpu_exits_2(tmp_path):
    """The Docker flow: `fastamp build` ahead of time, then FASTAMP_JIT=0 at run time uses that build;
    and `make gpu-check`'s driver on a machine without a GPU builds, says so and exits 2."""
    package = _package_copy(tmp_path / "pkg")
    shutil.copytree(ROOT / "tools", package / "tools")
    env = _env(FASTAMP_JIT="0", FASTAMP_CACHE_DIR=str(tmp_path / "cache"), MAX_JOBS="2", CUDA_VISIBLE_DEVICES="")
    build = subprocess.run([sys.executable, "-m", "fastamp.cli", "build", "--cpu-only"], env=env, cwd=package,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "compiled in" in build.stdout and "compiling kernels for torch" in build.stderr
    again = subprocess.run([sys.executable, "-m", "fastamp.cli", "build", "--cpu-only"], env=env, cwd=package,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already in the cache" in again.stdout, again.stdout + again.stderr
    info, stderr = _probe(sys.executable, env, package)
    assert info["kernels"] == "jit" and not info["compiled_on_this_import"] and "KernelFallbackWarning" not in stderr

    out = tmp_path / "gpu-check"
    run = subprocess.run([sys.executable, str(package / "tools" / "gpu_check.py"), "--out", str(out)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no GPU" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    statuses = {p["name"]: p["status"] for p in summary["phases"]}
    assert statuses.pop("build") == "PASS" and set(statuses.values()) == {"SKIP"}
    assert summary["build_info"]["kernels"] == "jit" and (out / "summary.md").is_file()


@pytest.mark.parametrize("large, driver, refuses", [
    (True, 11080, True), (True, 12000, True), (True, 12010, False), (True, 13000, False),
    (True, 0, False),  # no driver: no GPU to launch on
    (False, 11080, False),
])
def test_an_old_driver_refuses_the_32kb_parameter_layout(large, driver, refuses):
    from fastamp._extension import driver_refuses_kernels

    assert driver_refuses_kernels(large, driver) is refuses


def test_build_info_reports_the_parameter_layout_and_driver():
    info = fastamp.build_info()
    if not info["cuda_kernels"]:
        pytest.skip("no CUDA kernels built here")
    assert info["large_kernel_params"] == (_build.nvcc_version(_build.find_cuda_home() or "") >= (12, 1))


def test_gpu_check_refuses_an_unknown_phase_naming_the_phases(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path), "--only",
                          "pytest-compiled-step", "no-such-phase"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown phase(s) no-such-phase" in run.stderr, run.stderr
    assert "pytest-compiled-step" in run.stderr.split("the phases are:")[1]
