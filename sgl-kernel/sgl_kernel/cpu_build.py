"""Building sgl_kernel's CPU C kernels (csrc/*.c) on first use, shared by their ctypes wrappers.

A kernel's source ships with the package; `build_library` compiles it with the system C compiler
(`$CC`, default `gcc`) into a cache folder (`$SGLANG_KERNEL_CACHE`, default
`~/.cache/sglang/kernels`), keyed by a hash of the source, the flags and the compiler, and reuses
that file after that. Flags name instruction sets rather than `-march=native`, so a cache on a
home folder shared by several machines stays valid on each. OpenMP comes from the libgomp that
PyTorch already loaded (torch is imported before any kernel library), so a kernel's threads are
PyTorch's threads and the two never oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch  # noqa: F401  (loaded first: the kernels' libgomp.so.1 binds to torch's copy)

CACHE_ENV = "SGLANG_KERNEL_CACHE"
logger = logging.getLogger(__name__)


def _cpuinfo_field(name: str) -> str:
    """The first CPU's `name` line of /proc/cpuinfo ('' when it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty when it cannot be read)."""
    return set(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"; '' when it cannot be read)."""
    return _cpuinfo_field("vendor_id")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "sglang", "kernels")
    return Path(root)


def platform_reason(required: Sequence[str] = ()) -> str:
    """Why a kernel needing the CPU flags `required` cannot be built here ('' when it can)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = [f for f in required if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which(compiler()) is None:
        return f"no C compiler ({compiler()}) to build it"
    return ""


def compiler() -> str:
    return os.environ.get("CC", "gcc")


def build(source: Path, cflags: Sequence[str], stem: str) -> Path:
    """Compile `source` once per (source, flags, compiler); returns the shared library's path."""
    cc = compiler()
    # Headers beside the source are part of it: editing one rebuilds every kernel.
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join((cc, *cflags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent ranks never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *cflags, str(source), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(source: Path, cflags: Sequence[str], stem: str) -> ctypes.CDLL:
    """Build (when not cached) and load a kernel library; raises OSError / RuntimeError."""
    return ctypes.CDLL(str(build(source, cflags, stem)))


class LazyLibrary:
    """A kernel library built and loaded on first use, once per process, thread-safe.

    `setup(lib)` declares the ctypes signatures. The kernel is not used when `$enable_env` is "0",
    when `precheck()` returns a reason (it may also raise on a malformed setting), or when
    `platform_reason(required)` does; when building or loading fails, `reason` says why. The
    reason is logged once, followed by `fallback` (what runs instead) when given.

    Hot paths read `lib` directly and call `get()` only while it is None.
    """

    def __init__(
        self,
        source: Path,
        cflags: Sequence[str],
        stem: str,
        setup: Callable[[ctypes.CDLL], None],
        precheck: Optional[Callable[[], str]] = None,
        label: str = "",
        required: Sequence[str] = (),
        enable_env: str = "",
        fallback: str = "",
    ) -> None:
        self.source, self.cflags, self.stem = source, tuple(cflags), stem
        self.setup, self.precheck, self.label = setup, precheck, label or stem
        self.required, self.enable_env, self.fallback = tuple(required), enable_env, fallback
        self.lib: Optional[ctypes.CDLL] = None
        self.reason: Optional[str] = None
        self._lock = threading.Lock()

    def _why_not(self) -> str:
        if self.enable_env and os.environ.get(self.enable_env, "1") == "0":
            return f"{self.enable_env}=0"
        return (self.precheck() if self.precheck else "") or platform_reason(self.required)

    def get(self) -> Optional[ctypes.CDLL]:
        if self.lib is not None or self.reason is not None:
            return self.lib
        with self._lock:
            if self.lib is None and self.reason is None:
                self.reason = self._why_not() or None
                if self.reason is None:
                    try:
                        lib = load_library(self.source, self.cflags, self.stem)
                        self.setup(lib)
                        self.lib = lib
                    except (OSError, RuntimeError, AttributeError) as exc:
                        self.reason = f"build failed: {exc}"
                if self.lib is None and self.fallback:
                    logger.info("%s not used (%s): %s", self.label, self.reason, self.fallback)
                elif self.lib is None:
                    logger.info("%s not available (%s)", self.label, self.reason)
        return self.lib

    def available(self) -> bool:
        """True when the library is built and loaded (building it now if not decided yet)."""
        return self.get() is not None

    def unavailable_reason(self) -> Optional[str]:
        """Why the library cannot be used here; None when it can."""
        self.get()
        return self.reason
