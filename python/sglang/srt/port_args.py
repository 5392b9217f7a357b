"""PortArgs: the ipc endpoints that connect one server's processes, and its collective port."""

from __future__ import annotations

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
        ipc_dir = tempfile.mkdtemp(prefix="sglang-ipc-")
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
