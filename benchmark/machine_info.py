"""The header every CPU benchmark result carries: command, machine, date, load before the run.

Used by bench_kv_cache_dtype.py, bench_torch_compile.py and bench_event_loop_tokenize.py;
`write_result` prints a result and saves it under benchmark/results/. `load_average()` is read when the
benchmark starts (before any model loads), so the header says how busy the machine already was.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


# cpuinfo flags that decide which CPU kernel paths run (and so what a figure means).
KERNEL_FLAGS = {"avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "AVX512-BF16",
                "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name and its kernel-relevant features, e.g. "Xeon (AVX-512, AMX-INT8)"."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's lines
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    have = [label for flag, label in KERNEL_FLAGS.items() if flag in flags]
    return f"{name} ({', '.join(have) or 'no AVX-512'})"


def header(title: str, threads: int, load_before: str) -> list[str]:
    """Markdown lines: title, command, machine, date, load average before the run."""
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    now = datetime.datetime.now(datetime.timezone.utc)
    return [
        f"# {title}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {cpu_model()}, {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- Date: {now.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Load average before the run (`/proc/loadavg`): `{load_before}`",
    ]


RESULTS = Path(__file__).resolve().parent / "results"


def write_result(md: list[str], name: str, save: bool = True) -> None:
    """Print the markdown lines and, when `save`, write them to benchmark/results/<name>."""
    print("\n".join(md))
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / name).write_text("\n".join(md))
