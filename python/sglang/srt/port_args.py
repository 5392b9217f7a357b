"""PortArgs: the ipc endpoints that connect one server's processes, and its collective port.

Each server's sockets live in a private temp directory named after the main process's pid
(`sglang-ipc-<pid>-*`). A server that was SIGKILLed cannot remove its own, so every start first
removes the directories whose owner no longer runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs


@dataclass
class PortArgs:
    """ipc endpoints connecting one server's processes, plus the single-node collective port."""

    tokenizer_ipc_name: str  # detokenizer -> tokenizer manager
    scheduler_input_ipc_name: str  # tokenizer manager -> scheduler (TP rank 0)
    detokenizer_ipc_name: str  # scheduler -> detokenizer
    nccl_port: int
    ipc_dir: str = ""

    @staticmethod
    def init_new(server_args: ServerArgs) -> PortArgs:
        # A private directory per server keeps socket names unique and removable in one go.
        remove_stale_ipc_dirs()
        ipc_dir = tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-")
        nccl_port = server_args.nccl_port if server_args.nccl_port is not None else _free_port()
        return PortArgs(
            tokenizer_ipc_name=f"ipc://{os.path.join(ipc_dir, 'tokenizer')}",
            scheduler_input_ipc_name=f"ipc://{os.path.join(ipc_dir, 'scheduler_input')}",
            detokenizer_ipc_name=f"ipc://{os.path.join(ipc_dir, 'detokenizer')}",
            nccl_port=nccl_port,
            ipc_dir=ipc_dir,
        )

    def cleanup(self) -> None:
        """Remove the socket directory; call once every process has closed its sockets."""
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


IPC_DIR_PREFIX = "sglang-ipc-"


def remove_stale_ipc_dirs(tmp: str | None = None) -> list[str]:
    """Remove ipc directories left by servers that no longer run; returns those removed.

    A directory is stale when its owner pid is gone, or runs a process younger than the directory
    (the pid was reused). Directories of live servers and unparsable names are left alone."""
    import psutil

    removed = []
    for path in glob.glob(os.path.join(tmp or tempfile.gettempdir(), f"{IPC_DIR_PREFIX}*-*")):
        pid_text = os.path.basename(path)[len(IPC_DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            started = psutil.Process(int(pid_text)).create_time()
            # psutil derives start times from whole-second boot times: allow for that.
            owner_alive = started <= os.stat(path).st_mtime + 2.0
        except psutil.NoSuchProcess:
            owner_alive = False
        except (psutil.Error, OSError):
            continue  # cannot tell (another user's process, or the directory just went away)
        if not owner_alive:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
