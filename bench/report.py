"""Benchmark records: who measured what, where. Every result file names the device and the versions.

Used by every benchmark in ``bench/``: ``environment()`` describes the machine, ``write_results()``
writes ``bench/results/<name>-<device>.json`` and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_name() -> str:
    """The CUDA card's name, or ``cpu-<processor>-<n>cores``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def device_slug() -> str:
    """A file-name-safe short name of the device: ``h100``, ``cpu``..."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    m = re.search(r"(h100|h200|a100|l40s|l4|a10g|4090|3090)", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_commit() -> str | None:
    """The checkout's commit; ``FUSEDTUNE_COMMIT`` where the tree travelled without ``.git`` (device runs)."""
    if os.environ.get("FUSEDTUNE_COMMIT"):
        return os.environ["FUSEDTUNE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    """Device, library versions and commit, recorded with every result."""
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows of dicts as a Markdown table over ``columns`` (floats to 4 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str, rows: Sequence[dict], columns: Sequence[str], out_dir: Path | str | None = None
) -> Path:
    """Write ``<name>-<device>.json`` and ``.md`` under ``out_dir`` (default ``bench/results``).

    Returns:
        The path of the JSON file.
    """
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stem = out / f"{name}-{device_slug()}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": list(rows)}, indent=2))
    header = f"# {name}\n\nMeasured on **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
    header += f"bitsandbytes {env['bitsandbytes']}, commit {env['commit']}, {env['date']}.\n\n"
    stem.with_suffix(".md").write_text(header + markdown_table(rows, columns) + "\n")
    return stem.with_suffix(".json")


def gpu_bench_parser(doc: str, budget_default: float | None = None, budget_help: str | None = None):
    """The arguments every ``bench/gpu_*.py`` takes: ``--out DIR`` and ``--budget-s SECONDS``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=budget_default,
        help=budget_help or "start no new shape after this many seconds; write what ran",
    )
    return parser


def require_cuda(message: str) -> bool:
    """True with a CUDA device; otherwise print ``message`` to stderr (the caller exits 2)."""
    if torch.cuda.is_available():
        return True
    print(message, file=sys.stderr)
    return False


def time_and_peak(call, grads, warmup: int, rep: int) -> tuple[float, float, float, float]:
    """One GPU pass ``call``: ``do_bench`` (median, p20, p80) in ms and its peak memory in MiB above
    what is already held. A first call compiles / autotunes outside both; ``grads`` are reset between
    timed calls."""
    from triton.testing import do_bench

    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms, p20, p80 = do_bench(call, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads, warmup=warmup, rep=rep)
    return ms, p20, p80, peak
