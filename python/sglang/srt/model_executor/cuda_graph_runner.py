"""CudaGraphRunner: decode steps replayed from CUDA graphs captured once per batch-size bucket.

Owns the decode fast path of the model runner. At start-up it allocates static inputs for the
largest bucket (input_ids, positions, req_pool_indices, seq_lens, out_cache_loc), asks the
attention backend for its graph state (`init_cuda_graph_state`) and captures `model.forward` for
every bucket (1, 2, 4, 8, then every 8 up to `--cuda-graph-max-bs`, capped by the running-request
limit), largest first, all graphs sharing one memory pool. With `--return-attention-tokens`,
batches whose rows ask for attention tokens replay a capture graph that also runs the static
capture path (attention_capture/static.py), recorded for the batch-size bucket and the batch's
`StaticShape` (width bucket of its longest capturing row, the captured layers some row selected,
per-layer lists or not); those are captured on first use, at most `MAX_CAPTURE_GRAPHS` kept (least
recently used dropped), so start-up pays nothing for them. Batches that do not ask replay the plain
graph and pay nothing.

A replay copies the real batch into the static buffers, pads the rest of the bucket with dummy
rows (token 0 at position fill-1, the backend's seq_len fill value, req_to_token row 0, new K/V
into the pool's reserved padding slot 0, so no real slot is touched), lets the backend refresh its
metadata (`init_forward_metadata_replay_cuda_graph`), replays, and returns the logits sliced to
the real batch size. Extends and batches above the largest bucket run eagerly, and so do sizes
without their own bucket under `--disable-cuda-graph-padding`, and so do batches with layer probes
(hidden_states_layers, logit_lens: layers/layer_probe.py). `use_graphs=False` runs the same static, padded path without graphs (CPU tests).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglang.srt.attention_capture.static import StaticShape
    from sglang.srt.model_executor.forward_batch_info import ModelWorkerBatch

logger = logging.getLogger(__name__)

PAD_SLOT = 0  # MHATokenToKVPool reserves page 0 for padded tokens
PAD_REQ_ROW = 0  # padded rows read (never write) req_to_token row 0
# Capture graphs kept at once: (batch bucket, width bucket, selected layers, per-layer) shapes
# seen in traffic; the plain graphs are always kept.
MAX_CAPTURE_GRAPHS = 64


def graph_batch_sizes(max_bs: int, explicit: Optional[list[int]] = None) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 8, up to and including `max_bs` (or the explicit list)."""
    if max_bs < 1:
        return []
    if explicit:
        sizes = {b for b in explicit if 1 <= b <= max_bs}
    else:
        sizes = {b for b in (1, 2, 4) if b < max_bs} | set(range(8, max_bs, 8))
    sizes.add(max_bs)  # NOTE: the cap itself is a bucket, so every allowed batch has one
    return sorted(sizes)


class CudaGraphRunner:
    def __init__(self, model_runner: Any, use_graphs: bool = True) -> None:
        self.model_runner = model_runner
        self.model = model_runner.model
        self.backend = model_runner.attn_backend
        self.use_graphs = use_graphs
        args = model_runner.server_args
        cap = min(int(args.cuda_graph_max_bs), int(model_runner.max_running_requests))
        self.batch_sizes = graph_batch_sizes(cap, getattr(args, "cuda_graph_bs", None))
        if not self.batch_sizes:
            raise ValueError("no CUDA-graph batch sizes (check --cuda-graph-max-bs)")
        self.max_bs = self.batch_sizes[-1]
        self.disable_padding = bool(getattr(args, "disable_cuda_graph_padding", False))
        # With --enable-return-hidden-states the graphs keep the final hidden states as an output
        # (a tensor the forward computes anyway), so such requests replay too.
        self.capture_hidden = bool(getattr(args, "enable_return_hidden_states", False))
        self.device = torch.device(model_runner.device)
        self.fill = int(self.backend.get_cuda_graph_seq_len_fill_value())

        dev, i64 = self.device, torch.int64
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=i64, device=dev)
        self.positions = torch.full((n,), max(self.fill - 1, 0), dtype=i64, device=dev)
        self.req_pool_indices = torch.full((n,), PAD_REQ_ROW, dtype=i64, device=dev)
        self.seq_lens = torch.full((n,), self.fill, dtype=i64, device=dev)
        self.out_cache_loc = torch.full((n,), PAD_SLOT, dtype=i64, device=dev)
        self.backend.init_cuda_graph_state(n, n)

        self.capture_obj = model_runner.attention_capture
        if self.capture_obj is not None:
            width = min(model_runner.context_len, model_runner.max_total_num_tokens)
            self.capture_obj.init_static(n, width)
        # Key: (batch bucket, None) for plain graphs, (bucket, StaticShape) for capture graphs.
        self.graphs: OrderedDict[tuple[int, Optional[StaticShape]], Any] = OrderedDict()
        self.outputs: dict[tuple[int, Optional[StaticShape]], LogitsProcessorOutput] = {}
        self.pool: Any = None
        if use_graphs:
            self.capture()

    # ---- buckets and dispatch ------------------------------------------------------------------
    def bucket(self, bs: int) -> int:
        for size in self.batch_sizes:
            if size >= bs:
                return size
        raise ValueError(f"batch size {bs} exceeds the largest CUDA-graph bucket {self.max_bs}")

    def can_run(self, batch: "ModelWorkerBatch") -> bool:
        """A decode batch within the largest bucket whose capture (if any) the graphs hold."""
        if not batch.forward_mode.is_decode() or not 0 < batch.batch_size <= self.max_bs:
            return False
        if self.disable_padding and batch.batch_size not in self.batch_sizes:
            return False  # --disable-cuda-graph-padding: run eagerly rather than pad
        if batch.layer_probe is not None:
            return False  # layer probes (hidden_states_layers, logit_lens) run eagerly
        # A capturing batch (its CaptureSpec, any layer aggregation, spans, statistics) needs the
        # capture buffers; head selection runs eagerly (CaptureSpec.plain_heads).
        spec = batch.attention_capture
        return spec is None or (self.capture_obj is not None and spec.plain_heads)

    # ---- capture -------------------------------------------------------------------------------
    def _static_batch(self, bs: int) -> ForwardBatch:
        """A decode ForwardBatch over views of the static buffers (fresh views every call)."""
        mr = self.model_runner
        ones = torch.ones(bs, dtype=torch.int64, device=self.device)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[self.fill] * bs,
            out_cache_loc=self.out_cache_loc[:bs],
            extend_prefix_lens=self.seq_lens[:bs] - 1,
            extend_seq_lens=ones,
            extend_prefix_lens_cpu=[self.fill - 1] * bs,
            extend_seq_lens_cpu=[1] * bs,
            extend_start_loc=torch.arange(bs, dtype=torch.int64, device=self.device),
            req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool=mr.token_to_kv_pool,
            attn_backend=self.backend,
            capture_hidden_states=self.capture_hidden,
        )

    def _run_static(self, bs: int, shape: Optional[StaticShape]) -> LogitsProcessorOutput:
        """The captured region: one padded decode forward (plus the static capture)."""
        fb = self._static_batch(bs)
        if shape is None:
            return self.model(fb.input_ids, fb.positions, fb)
        cap = self.capture_obj
        try:
            cap.static_begin(bs, shape)
            fb.attention_capture = cap
            out = self.model(fb.input_ids, fb.positions, fb)
            cap.static_finish(fb, bs)
        finally:
            cap.static_abort()
        return out

    def _capture_one(self, bs: int, shape: Optional[StaticShape]) -> None:
        """Record the graph of bucket `bs` and `shape` from the static buffers as they are."""
        self.backend.init_forward_metadata_capture_cuda_graph(
            bs, bs, self.req_pool_indices[:bs], self.seq_lens[:bs], ForwardMode.DECODE
        )
        stream = torch.cuda.Stream(device=self.device)
        # Warm-up on the side stream: autotuning and lazy allocations stay out of the graph.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run_static(bs, shape)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = self._run_static(bs, shape)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(bs, shape)] = graph
        self.outputs[(bs, shape)] = out

    def capture(self) -> None:
        """The plain graph of every bucket (capture graphs are recorded on first use)."""
        start = time.perf_counter()
        with torch.inference_mode():
            for bs in reversed(self.batch_sizes):
                self._capture_one(bs, None)
        torch.cuda.synchronize(self.device)
        logger.info(
            "Captured %d CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.batch_sizes,
            time.perf_counter() - start,
        )

    def _graph(self, bs: int, shape: Optional[StaticShape]) -> tuple[Any, LogitsProcessorOutput]:
        """The graph for (bs, shape), recorded now if missing (the static buffers already hold
        the batch, so its warm-up runs compute exactly what the replay will)."""
        key = (bs, shape)
        if key not in self.graphs:
            start = time.perf_counter()
            captured = [k for k in self.graphs if k[1] is not None]
            if len(captured) >= MAX_CAPTURE_GRAPHS:
                oldest = captured[0]
                del self.graphs[oldest], self.outputs[oldest]
            self._capture_one(bs, shape)
            logger.info(
                "Captured an attention-capture CUDA graph (bs=%d, width=%d, layers=%s, "
                "per_layer=%s) in %.2f s",
                bs,
                shape.width,
                list(shape.layers),
                shape.per_layer,
                time.perf_counter() - start,
            )
        self.graphs.move_to_end(key)
        return self.graphs[key], self.outputs[key]

    # ---- replay --------------------------------------------------------------------------------
    def replay(self, forward_batch: ForwardBatch, spec: Any = None) -> LogitsProcessorOutput:
        """Run a decode batch through its bucket's graph; logits sliced to the real rows.

        `spec` is the worker batch's CaptureSpec (None when no row captures in this step).
        """
        fb = forward_batch
        bs = fb.batch_size
        pbs = self.bucket(bs)
        self.input_ids[:bs].copy_(fb.input_ids, non_blocking=True)
        self.positions[:bs].copy_(fb.positions, non_blocking=True)
        self.req_pool_indices[:bs].copy_(fb.req_pool_indices, non_blocking=True)
        self.seq_lens[:bs].copy_(fb.seq_lens, non_blocking=True)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc, non_blocking=True)
        if pbs > bs:
            self.input_ids[bs:pbs].zero_()
            self.positions[bs:pbs].fill_(max(self.fill - 1, 0))
            self.req_pool_indices[bs:pbs].fill_(PAD_REQ_ROW)
            self.seq_lens[bs:pbs].fill_(self.fill)
            self.out_cache_loc[bs:pbs].fill_(PAD_SLOT)
        seq_lens_cpu = list(fb.seq_lens_cpu) + [self.fill] * (pbs - bs)
        self.backend.init_forward_metadata_replay_cuda_graph(
            pbs,
            self.req_pool_indices[:pbs],
            self.seq_lens[:pbs],
            sum(seq_lens_cpu),
            ForwardMode.DECODE,
            seq_lens_cpu=torch.tensor(seq_lens_cpu, dtype=torch.int64),
        )
        shape = None
        if spec is not None:
            shape = self.capture_obj.static_shape(spec, fb.seq_lens_cpu)
            self.capture_obj.load_static(spec, pbs)
        if self.use_graphs:
            graph, full = self._graph(pbs, shape)
            graph.replay()
        else:
            full = self._run_static(pbs, shape)
        out = LogitsProcessorOutput(next_token_logits=full.next_token_logits[:bs])
        if fb.capture_hidden_states:
            out.hidden_states = full.hidden_states[:bs]
        if spec is not None:
            out.attention_capture = self.capture_obj.static_result(spec, fb.seq_lens_cpu)
        return out
