"""The result file of the scripted benchmarks (guard_overhead.py, hf_trainer.py): pytest-benchmark's
shape, so that summarize.py renders them with the rest, plus fastamp bench's environment record."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from fastamp.cli.bench import environment

__all__ = ["write_report"]


def write_report(path: str, device: str, benchmarks: List[Dict[str, Any]]) -> None:
    """Write ``benchmarks`` (pytest-benchmark entries: group, name, stats.data, extra_info) to ``path``."""
    env = environment(device)
    report = {"machine_info": {"cpu": {"brand_raw": env["device_name"]}, **env},
              "commit_info": {"id": env["git_commit"]}, "datetime": env["date"], "benchmarks": benchmarks}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
