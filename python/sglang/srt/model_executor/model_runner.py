"""ModelRunner: one TP rank's model, KV memory, attention backend and sampler.

Owns start-up of the execution side (load weights, size and allocate the KV pool from
`--max-total-tokens` or `--mem-fraction-static`, pick the attention backend) and the two per-step
calls the scheduler's worker makes: `forward(ModelWorkerBatch)` and `sample(...)`. With
`--enable-torch-compile`, decode batches up to `--torch-compile-max-bs` run the compiled forward
(torch_compile.py); the KV pool's dtype follows `--kv-cache-dtype` (float8: one byte per element,
so the same memory holds twice the tokens of bf16). It imports
nothing from the serving stack, so `bench_one_batch` and GPU tests run on bare machines.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Optional

import torch

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import (
    all_reduce_min_int,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.layers.attention import create_model_attention_backend
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.sampler import Sampler, SamplerOutput
from sglang.srt.mem_cache.allocator import create_allocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ModelWorkerBatch
from sglang.srt.model_loader import get_model
from sglang.srt.startup_timing import StartupTimer

logger = logging.getLogger(__name__)

# `--kv-cache-dtype` values this runner builds (server_args refuses the others); None = model dtype.
_KV_DTYPES = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


# On CPU the default pool (no --max-total-tokens, no --mem-fraction-static) holds at most this
# many full contexts: enough for the batches a CPU decodes at a useful speed, without claiming a
# quarter of the host's RAM (gigabytes, for a 135M model) that a request never touches.
CPU_DEFAULT_POOL_CONTEXTS = 8


def cpu_default_pool_cap(context_len: int) -> int:
    """Most tokens a default-sized CPU pool holds (docs/server_arguments.md, KV pool size)."""
    return CPU_DEFAULT_POOL_CONTEXTS * int(context_len)


def available_device_memory(device: str) -> int:
    """Bytes free for weights + KV: free GPU memory, or available RAM on CPU."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


class ModelRunner:
    def __init__(
        self, model_config: ModelConfig, server_args: Any, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.model_config = model_config
        self.server_args = server_args
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.device = server_args.device
        self.dtype: torch.dtype = model_config.dtype
        self.page_size = server_args.page_size
        if server_args.random_seed is not None:
            torch.manual_seed(server_args.random_seed)

        # Phase times of this runner's start-up, for the scheduler's `Start-up` log line.
        self.startup = StartupTimer()
        memory_before = available_device_memory(self.device)
        start = time.perf_counter()
        self.model = get_model(
            model_config=model_config,
            load_config=LoadConfig(
                load_format=server_args.load_format,
                gguf_dequantize=bool(getattr(server_args, "gguf_dequantize", False)),
            ),
            device=self.device,
        )
        # Buffers count: int4 layers keep their packed weights there (layers/quantization/).
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        self.weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
        logger.info(
            "Load weight end. elapsed=%.2f s, type=%s, dtype=%s, weights=%.2f GB",
            time.perf_counter() - start,
            type(self.model).__name__,
            self.dtype,
            self.weight_bytes / 2**30,
        )
        self.startup.mark("load weights")
        self.init_memory_pool(memory_before)
        self.startup.mark("KV pool")
        self.attn_backend = create_model_attention_backend(self)
        self.sampler = Sampler()
        self.attention_capture: Optional[Any] = None
        if getattr(server_args, "return_attention_tokens", False):
            self.init_attention_capture()
        self.startup.mark("attention backend")
        self.cuda_graph_runner: Optional[Any] = None
        if self.device.startswith("cuda") and not server_args.disable_cuda_graph:
            self.init_cuda_graphs()
            self.startup.mark("CUDA graphs")
        self.compiled_forward: Optional[Any] = None
        self.torch_compile_max_bs = int(server_args.torch_compile_max_bs)
        if server_args.enable_torch_compile:
            from sglang.srt.model_executor.torch_compile import compile_decode_forward

            self.compiled_forward = compile_decode_forward(self.model, self.device)
            self.startup.mark("torch.compile")

    # ---- memory -------------------------------------------------------------------------------
    @property
    def kv_dtype(self) -> torch.dtype:
        name = self.server_args.kv_cache_dtype or "auto"
        if name not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype {name!r} is not supported")
        return _KV_DTYPES[name] or self.dtype

    def profile_max_num_token(self, memory_before: int) -> int:
        mc = self.model_config
        cell = MHATokenToKVPool.cell_size_bytes(
            mc.get_num_kv_heads(self.tp_size), mc.head_dim, mc.num_hidden_layers, self.kv_dtype
        )
        fraction = self.server_args.mem_fraction_static
        default_fraction = fraction is None
        if default_fraction:
            fraction = 0.88 if self.device.startswith("cuda") else 0.25
        if not self.device.startswith("cuda"):
            # NOTE: every rank on this host draws from the same RAM.
            args = self.server_args
            fraction /= max(1, args.dp_size * self.tp_size // args.nnodes)
        fixed = self.fixed_buffer_bytes()
        budget = memory_before * fraction - self.weight_bytes - fixed
        if budget < cell * 64:
            raise RuntimeError(
                f"not enough memory for the KV cache: {memory_before / 2**30:.1f} GB available, "
                f"weights take {self.weight_bytes / 2**30:.2f} GB, request table and capture "
                f"buffers {fixed / 2**30:.2f} GB, mem_fraction_static={fraction}; "
                "raise --mem-fraction-static or set --max-total-tokens"
            )
        tokens = int(budget // cell)
        if default_fraction and not self.device.startswith("cuda"):
            tokens = min(tokens, cpu_default_pool_cap(mc.context_len))
        return tokens

    def running_requests_bound(self) -> int:
        """--max-running-requests, or the device's default before the pool size caps it."""
        default = 1024 if self.device.startswith("cuda") else 256
        return int(self.server_args.max_running_requests or default)

    def fixed_buffer_bytes(self) -> int:
        """Bytes allocated beside the KV pool whatever its size, taken out of its budget: the
        req_to_token table and, with --return-attention-tokens, the capture buffers (upper
        bounds: the running-request limit before the pool caps it, the whole context)."""
        args, mc = self.server_args, self.model_config
        rows = self.running_requests_bound()
        total = ReqToTokenPool.size_bytes(rows + 1, mc.context_len + 4)
        if getattr(args, "return_attention_tokens", False):
            from sglang.srt.attention_capture import AttentionCapture, resolve_capture_layers

            layers = resolve_capture_layers(args.attention_capture_layers, mc.num_hidden_layers)
            graphs = self.device.startswith("cuda") and not args.disable_cuda_graph
            total += AttentionCapture.buffer_bytes(
                len(layers),
                rows,
                mc.context_len,
                int(args.attention_tokens_top_k),
                graph_bs=min(int(args.cuda_graph_max_bs), rows) if graphs else 0,
            )
        return total

    def init_memory_pool(self, memory_before: int) -> None:
        args, mc = self.server_args, self.model_config
        if args.max_total_tokens is not None:
            max_tokens = int(args.max_total_tokens)
        else:
            max_tokens = self.profile_max_num_token(memory_before)
            # NOTE: TP ranks must agree on the pool size, or their schedulers would diverge.
            max_tokens = all_reduce_min_int(max_tokens)
        max_tokens = max_tokens // self.page_size * self.page_size
        if max_tokens < self.page_size * 2:
            raise ValueError(
                f"--max-total-tokens {max_tokens} is too small for page size {self.page_size}"
            )
        self.max_total_num_tokens = max_tokens
        self.max_running_requests = int(
            args.max_running_requests or min(self.running_requests_bound(), max_tokens)
        )
        self.context_len = mc.context_len
        self.req_to_token_pool = ReqToTokenPool(
            self.max_running_requests + 1, self.context_len + 4, self.device
        )
        self.token_to_kv_pool = MHATokenToKVPool(
            max_tokens,
            self.page_size,
            self.kv_dtype,
            mc.get_num_kv_heads(self.tp_size),
            mc.head_dim,
            mc.num_hidden_layers,
            self.device,
        )
        self.token_to_kv_pool_allocator = create_allocator(max_tokens, self.page_size, self.device)
        logger.info(
            "Memory pool end. max_total_num_tokens=%d, max_running_requests=%d, kv=%.2f GB (%s)",
            max_tokens,
            self.max_running_requests,
            self.token_to_kv_pool.get_kv_size_bytes() / 2**30,
            self.kv_dtype,
        )

    def init_attention_capture(self) -> None:
        """Allocate the attention-capture buffers (only with --return-attention-tokens)."""
        from sglang.srt.attention_capture import AttentionCapture, resolve_capture_layers

        layers = resolve_capture_layers(
            self.server_args.attention_capture_layers, self.model_config.num_hidden_layers
        )
        self.attention_capture = AttentionCapture.from_model_runner(self, layers)

    def init_cuda_graphs(self) -> None:
        """Capture the decode CUDA graphs; backends without graph support run eagerly."""
        from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

        try:
            self.cuda_graph_runner = CudaGraphRunner(self)
        except NotImplementedError as e:
            logger.warning("CUDA graphs disabled: %s", e)
            self.cuda_graph_runner = None

    # ---- one step -----------------------------------------------------------------------------
    def forward(self, batch: ModelWorkerBatch) -> tuple[LogitsProcessorOutput, ForwardBatch]:
        graphs = self.cuda_graph_runner
        use_graph = graphs is not None and graphs.can_run(batch)
        fb = ForwardBatch.init_new(
            batch,
            device=torch.device(self.device),
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.token_to_kv_pool,
            attn_backend=self.attn_backend,
            init_attn_metadata=not use_graph,
        )
        if use_graph:
            with torch.inference_mode():
                return graphs.replay(fb, batch.attention_capture), fb
        model = self.model
        if (
            self.compiled_forward is not None
            and fb.forward_mode.is_decode()
            and fb.batch_size <= self.torch_compile_max_bs
            and fb.layer_probe is None  # the taps are Python the compiled graph does not hold
        ):
            model = self.compiled_forward
        capture = self.attention_capture
        if batch.attention_capture is None or capture is None:
            with torch.inference_mode():
                return model(fb.input_ids, fb.positions, fb), fb
        # Rows that asked for attention tokens: the capture rides along the forward.
        with torch.inference_mode():
            try:
                capture.begin(batch.attention_capture, fb)
                fb.attention_capture = capture
                out = model(fb.input_ids, fb.positions, fb)
                out.attention_capture = capture.finish()
            finally:
                capture.abort()
        return out, fb

    def sample(
        self, logits_output: LogitsProcessorOutput, forward_batch: ForwardBatch
    ) -> SamplerOutput:
        with torch.inference_mode():
            return self.sampler(
                logits_output.next_token_logits,
                forward_batch.sampling_info,
                return_logprob=forward_batch.return_logprob,
                top_logprobs_nums=forward_batch.top_logprobs_nums,
            )

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def build_model_runner(
    server_args: Any,
    model_config: Optional[ModelConfig] = None,
    tp_rank: Optional[int] = None,
    tp_size: Optional[int] = None,
) -> ModelRunner:
    """The runner of one TP rank; rank and size default to the initialized TP group's."""
    model_config = model_config or ModelConfig.from_server_args(server_args)
    tp_rank = get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    tp_size = get_tensor_model_parallel_world_size() if tp_size is None else tp_size
    return ModelRunner(model_config, server_args, tp_rank=tp_rank, tp_size=tp_size)
