"""The `sglang` console script: `sglang serve [launch_server flags]`."""

from __future__ import annotations

import sys
from typing import Optional

USAGE = "usage: sglang serve --model-path PATH [options]   (see: sglang serve --help)"


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] != "serve":
        print(f"sglang: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    from sglang.srt.entrypoints.http_server import main_from_argv

    main_from_argv(args[1:])


if __name__ == "__main__":
    main()
