"""A/B of two revisions of the CPU GGUF GEMM (sgl-kernel/sgl_kernel/csrc/cpu_gemm_gguf.c).

Builds the file as it is at `--base` (a git revision) and as it is in the working tree, loads
both libraries in this process and times them alternately, round by round, on SmolLM2-135M's
matmul shapes (random codes and scales, the packed layout of the working tree's `pack`, which
both revisions must share), so machine drift lands on both alike. Every output of the two is
compared bit for bit. Prints one line per shape and row count: median ms of each, the speed-up
and whether the outputs are identical; `--name` also writes the table (with the command, machine,
date and load average) to benchmark/results/<name>.md. `--isas A B` pins each side's code path
(names of cpu_gemm_gguf.ISAS; `--base tree` builds the working tree on both sides, so this
compares two paths of one revision).

    .venv/bin/python benchmark/bench_gguf_kernel_ab.py --base HEAD~1 --threads 2
    .venv/bin/python benchmark/bench_gguf_kernel_ab.py --base tree --isas avx512 amx
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from sgl_kernel import cpu_gemm_gguf

from machine_info import header, load_average, write_result

REPO = Path(__file__).resolve().parents[1]
SOURCE = "sgl-kernel/sgl_kernel/csrc/cpu_gemm_gguf.c"
# (n, k, qtype): SmolLM2-135M's LM head (Q8_0) and its Q4_1 projections.
SHAPES = [(49152, 576, "Q8_0"), (1536, 576, "Q4_1"), (576, 1536, "Q4_1"), (3072, 576, "Q4_1")]


def build(source: str, into: Path, name: str) -> ctypes.CDLL:
    """Compile `source` (C text) as cpu_gemm_gguf's library is compiled; load it."""
    c_file, so_file = into / f"{name}.c", into / f"{name}.so"
    c_file.write_text(source)
    include = REPO / "sgl-kernel/sgl_kernel/csrc"
    subprocess.run(["cc", *cpu_gemm_gguf.CFLAGS, f"-I{include}", str(c_file), "-o", str(so_file)],
                   check=True)  # fmt: skip
    lib = ctypes.CDLL(str(so_file))
    # sgl_gguf_gemm's signature (the only entry timed here), as sgl_kernel.cpu_gemm_gguf sets it.
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sgl_gguf_gemm.argtypes = [ptr, i64, c_int, i64, i64, ptr, i64, *(c_int,) * 4, ptr, ptr,
                                  *(c_int,) * 4]  # fmt: skip
    lib.sgl_gguf_gemm.restype = c_int
    return lib


def random_weight(n: int, k: int, qtype: str) -> torch.Tensor:
    fmt = cpu_gemm_gguf.FORMATS[qtype]
    codes = torch.randint(0, 1 << fmt.bits, (n, k), dtype=torch.uint8)
    scale = (torch.rand(n, k // 32) * 0.01).half().float()
    mins = (torch.rand(n, k // 32) * -0.01).half().float() if fmt.has_min else None
    return cpu_gemm_gguf.pack(codes, scale, mins, qtype)


def gemm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, n: int, qtype: str,
         y: torch.Tensor, threads: int, isa: str) -> None:  # fmt: skip
    fmt = cpu_gemm_gguf.FORMATS[qtype]
    rc = lib.sgl_gguf_gemm(x.data_ptr(), x.stride(0), 0, x.shape[0], x.shape[1], w.data_ptr(), n,
                           fmt.bits, fmt.zp, int(fmt.has_min), int(fmt.scale_f32), None,
                           y.data_ptr(), 0, cpu_gemm_gguf.ACTS["int8x2"],
                           cpu_gemm_gguf.ISAS[isa], threads)  # fmt: skip
    assert rc == 0, f"sgl_gguf_gemm returned {rc} (isa {isa}: not run by this CPU?)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision of the A side ('tree': as B)")
    p.add_argument(
        "--isas",
        nargs=2,
        default=["auto", "auto"],
        choices=sorted(cpu_gemm_gguf.ISAS),
        metavar=("A", "B"),
        help="code path of each side (default: auto)",
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 48, 64, 256])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", help="also write benchmark/results/<name>.md")
    args = p.parse_args()
    torch.manual_seed(0)
    tree_src = (REPO / SOURCE).read_text()
    base_src = tree_src if args.base == "tree" else subprocess.run(
        ["git", "-C", str(REPO), "show", f"{args.base}:{SOURCE}"],
        check=True, capture_output=True, text=True).stdout  # fmt: skip
    isa = dict(zip(("base", "tree"), args.isas))
    label = {side: f"{rev} ({isa[side]})" if args.isas != ["auto", "auto"] else rev
             for side, rev in (("base", "working tree" if args.base == "tree" else args.base),
                               ("tree", "working tree"))}  # fmt: skip
    load_before = load_average()
    lines = [f"| shape | rows | {label['base']} ms | {label['tree']} ms | speed-up | identical |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build(base_src, Path(tmp), "base"),
                "tree": build(tree_src, Path(tmp), "tree")}  # fmt: skip
        for n, k, qtype in SHAPES:
            w = random_weight(n, k, qtype)
            for m in args.rows:
                x = torch.randn(m, k)
                out = {side: torch.empty(m, n) for side in libs}
                reps = max(3, min(200, int(3e8 / (m * n * k))))
                times: dict[str, list[float]] = {side: [] for side in libs}
                for _ in range(args.rounds):
                    for side, lib in libs.items():
                        gemm(lib, x, w, n, qtype, out[side], args.threads, isa[side])
                        begin = time.perf_counter()
                        for _ in range(reps):
                            gemm(lib, x, w, n, qtype, out[side], args.threads, isa[side])
                        times[side].append((time.perf_counter() - begin) / reps * 1e3)
                a, b = statistics.median(times["base"]), statistics.median(times["tree"])
                same = torch.equal(out["base"], out["tree"])
                shape = f"{qtype} {n}x{k}"
                print(f"{shape} m={m}: base {a:.3f} ms, tree {b:.3f} ms, x{a / b:.2f}, "
                      f"identical {same}", flush=True)  # fmt: skip
                lines.append(f"| {shape} | {m} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {same} |")
    title = f"CPU GGUF GEMM: {label['base']} vs {label['tree']} ({SOURCE})"
    md = header(title, args.threads, load_before)
    md += [f"- Load average after: `{load_average()}`", f"- Rounds: {args.rounds}, alternating", ""]
    write_result(md + lines + [""], f"{args.name}.md", save=bool(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
