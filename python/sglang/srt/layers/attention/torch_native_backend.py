"""torch_native attention backend: batched attention over the paged KV pool in plain torch.

Owns the reference attention path for CPU and GPU. Each forward builds, once for all layers, a
padded [batch, max_query, max_kv] view of the batch: which KV slot holds each key position, which
flat token each padded query is, and an additive causal/padding mask. Every layer then gathers its
K/V through those slots and runs one batched softmax attention that also yields each head's
log-sum-exp. Grouped-query heads are folded into the query axis so K/V are never repeated. There is
no Python loop over requests; extend and decode share the path (decode is a 1-token extend).
K/V are read in the query dtype; a float8 pool (`--kv-cache-dtype fp8_*`) is widened on the
gather, its per-tensor scales folded into the softmax scale and the output. On CPU, a decode
batch over a float32 / bfloat16 pool of the query's dtype takes one C call per layer instead
(sgl_kernel.cpu_layer.decode_attention: stores the new K/V and attends in place through
req_to_token, float32 softmax), which removes some twenty operator calls per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from sgl_kernel import cpu_layer
from sgl_kernel.attention_scores import key_visible, softcap

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend, AttnOutput

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class TorchNativeMetadata:
    batch_size: int
    max_q: int
    max_kv: int
    no_prefix: bool = False  # extend of fresh prompts: keys are exactly this forward's tokens
    decode: bool = False  # one query per request, in request order
    uniform: bool = False  # every request extends by max_q tokens: the padded layout is a view
    # The padded layout's index tensors, built on first use (`TorchNativeAttnBackend._indexed`):
    # a CPU decode batch on the C kernel never reads them.
    kv_slots: Optional[torch.Tensor] = None  # [B, max_kv] KV slot of each key position (pad: 0)
    q_index: Optional[torch.Tensor] = None  # [B, max_q] flat token of each padded query (pad: 0)
    out_index: Optional[torch.Tensor] = None  # [num_tokens] row of each token in [B*max_q]
    q_pos: Optional[torch.Tensor] = None  # [B, max_q] absolute position of each padded query
    key_valid: Optional[torch.Tensor] = None  # [B, max_kv] key position < seq_len
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


def sdpa_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool = False,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(cap(q k^T * scale) + mask) v and logsumexp of the masked, capped scores (float32).

    q: [B, H, Lq, D], k/v: [B, H, Lk, D], mask: additive, broadcastable to [B, H, Lq, Lk];
    `causal` (with mask None and Lq == Lk) masks key j > query i instead. `logit_cap` > 0
    soft-caps the scaled scores first (sgl_kernel.attention_scores.softcap); CPU's fused kernel
    cannot, so capped layers take the explicit path.
    """
    if q.device.type == "cpu" and logit_cap <= 0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse
    if causal:
        pos = torch.arange(q.shape[-2], device=q.device)
        mask = torch.zeros(pos.shape[0], pos.shape[0], device=q.device).masked_fill_(
            ~key_visible(pos[:, None], pos[None, :], -1), float("-inf")
        )
    scores = softcap(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, logit_cap)
    scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs.to(v.dtype), v), lse


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, model_runner: Any) -> None:
        self.device = torch.device(model_runner.device)
        self.dtype: torch.dtype = model_runner.dtype
        self.req_to_token: torch.Tensor = model_runner.req_to_token_pool.req_to_token
        self.forward_metadata: Optional[TorchNativeMetadata] = None
        self._batch: Optional["ForwardBatch"] = None  # the forward the metadata describes

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        bs = fb.batch_size
        max_q = max(fb.extend_seq_lens_cpu)
        num_tokens = fb.input_ids.shape[0]
        self._batch = fb
        self.forward_metadata = TorchNativeMetadata(
            batch_size=bs,
            max_q=max_q,
            max_kv=max(fb.seq_lens_cpu),
            no_prefix=fb.forward_mode.is_extend() and max(fb.extend_prefix_lens_cpu) == 0,
            decode=max_q == 1 and num_tokens == bs,
            uniform=num_tokens == bs * max_q,
        )

    def _indexed(self) -> TorchNativeMetadata:
        """The forward's metadata with its padded-layout index tensors (built once)."""
        md = self.forward_metadata
        assert md is not None, "init_forward_metadata must run before attention"
        if md.kv_slots is not None:
            return md
        fb, bs, max_q, max_kv = self._batch, md.batch_size, md.max_q, md.max_kv
        dev = fb.seq_lens.device
        i = torch.arange(max_q, device=dev)
        q_valid = i[None, :] < fb.extend_seq_lens[:, None]
        md.q_index = torch.where(q_valid, fb.extend_start_loc[:, None] + i[None, :], 0)
        md.q_pos = fb.extend_prefix_lens[:, None] + i[None, :]
        batch_of_token = torch.repeat_interleave(
            torch.arange(bs, device=dev), fb.extend_seq_lens, output_size=fb.input_ids.shape[0]
        )
        offset_in_req = fb.positions - fb.extend_prefix_lens[batch_of_token]
        md.out_index = batch_of_token * max_q + offset_in_req
        j = torch.arange(max_kv, device=dev)
        md.key_valid = j[None, :] < fb.seq_lens[:, None]
        slots = self.req_to_token[fb.req_pool_indices, :max_kv]
        md.kv_slots = torch.where(md.key_valid, slots, 0)
        return md

    def _mask(
        self, md: TorchNativeMetadata, group: int, window: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask [B, 1, group*max_q, max_kv], cached per (group, window) for the forward."""
        key = (group, window)
        mask = md.masks.get(key)
        if mask is not None:
            return mask.to(dtype)
        j = torch.arange(md.max_kv, device=md.q_pos.device)
        allowed = key_visible(md.q_pos[:, :, None], j[None, None, :], window)
        allowed &= md.key_valid[:, None, :]
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        additive.masked_fill_(~allowed, float("-inf"))
        # Fold query heads of one KV head into the query axis: row r = g * max_q + i.
        bs = md.batch_size
        mask = additive[:, None, None].expand(bs, 1, group, md.max_q, md.max_kv)
        mask = mask.reshape(bs, 1, group * md.max_q, md.max_kv)
        md.masks[key] = mask
        return mask

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        forward_batch: "ForwardBatch",
        save_kv_cache: bool,
        return_lse: bool,
    ) -> AttnOutput:
        md = self.forward_metadata
        assert md is not None, "init_forward_metadata must run before attention"
        pool = forward_batch.token_to_kv_pool
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        group = hq // hkv
        k_scale, v_scale = pool.kv_scales(layer)
        if md.decode and self._cpu_decode_ok(q, k, pool, k_scale, v_scale):
            fb = forward_batch
            out, lse = cpu_layer.decode_attention(
                q,
                pool.get_key_buffer(layer.layer_id),
                pool.get_value_buffer(layer.layer_id),
                self.req_to_token,
                fb.req_pool_indices,
                fb.seq_lens,
                hkv,
                layer.scaling,
                window=layer.sliding_window_size,
                logit_cap=layer.logit_cap,
                new_kv=(k, v, fb.out_cache_loc) if save_kv_cache else None,
                return_lse=return_lse,
                max_seq_len=md.max_kv,
            )
            return (out, lse) if return_lse else out
        if save_kv_cache:
            loc = forward_batch.out_cache_loc
            pool.set_kv_buffer(
                layer.layer_id, loc, k.view(-1, hkv, d), v.view(-1, hkv, d), k_scale, v_scale
            )
        bs, max_q = md.batch_size, md.max_q
        window = layer.sliding_window_size
        if (
            md.no_prefix
            and (window <= 0 or window >= max_q)
            and pool.dtype == q.dtype
            and layer.logit_cap <= 0
        ):
            return self._attend_fresh(q, k, v, layer, return_lse)

        md = self._indexed()
        keys = self._gather(pool.get_key_buffer(layer.layer_id), md).to(q.dtype).transpose(1, 2)
        values = self._gather(pool.get_value_buffer(layer.layer_id), md).to(q.dtype).transpose(1, 2)
        # Without padding (decode, or equal extend lengths) the padded layout is a view.
        qp = (
            q.view(bs, max_q, hq, d) if md.uniform else q.view(-1, hq, d)[md.q_index]
        )  # [B, max_q, Hq, D]
        qp = (
            qp.view(bs, max_q, hkv, group, d)
            .permute(0, 2, 3, 1, 4)
            .reshape(bs, hkv, group * max_q, d)
        )
        mask = self._mask(md, group, layer.sliding_window_size, q.dtype)
        # A float8 pool's per-tensor scales fold into the softmax scale and the output: exact,
        # and the LSE stays that of the true scores.
        out, lse = sdpa_with_lse(
            qp, keys, values, mask, layer.scaling * k_scale, logit_cap=layer.logit_cap
        )
        if v_scale != 1.0:
            out = out * v_scale

        out = out.view(bs, hkv, group, max_q, d).permute(0, 3, 1, 2, 4).reshape(bs * max_q, hq * d)
        lse = lse.view(bs, hkv, group, max_q).permute(0, 3, 1, 2).reshape(bs * max_q, hq)
        if not md.uniform:
            out, lse = out[md.out_index], lse[md.out_index]
        return (out, lse) if return_lse else out

    @staticmethod
    def _cpu_decode_ok(
        q: torch.Tensor, k: torch.Tensor, pool: Any, k_scale: float, v_scale: float
    ) -> bool:
        """Whether the C decode-attention kernel can serve this layer (see the module doc)."""
        return (
            pool.dtype == q.dtype == k.dtype
            and pool.store_dtype == pool.dtype
            and k_scale == 1.0
            and v_scale == 1.0
            and cpu_layer.usable(q)
        )

    @staticmethod
    def _gather(buf: torch.Tensor, md: TorchNativeMetadata) -> torch.Tensor:
        """[B, max_kv, H, D] rows of a pool buffer; index_select copies far faster than indexing."""
        return buf.index_select(0, md.kv_slots.reshape(-1)).view(
            md.batch_size, md.max_kv, *buf.shape[1:]
        )

    def _attend_fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        return_lse: bool,
    ) -> AttnOutput:
        """Prompts with no cached prefix: the keys are this forward's own tokens, so plain causal
        attention over the padded batch is exact (padding keys come after every real query). It
        skips the pool gather and the explicit mask, which lets the kernel skip masked blocks."""
        md = self.forward_metadata
        if not md.uniform:
            md = self._indexed()
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        bs, max_q = md.batch_size, md.max_q
        if md.uniform:  # no padding: the flat tokens are already [B, max_q] in order
            qp = q.reshape(bs, max_q, hq, d).transpose(1, 2)
            kp = k.reshape(bs, max_q, hkv, d).transpose(1, 2)
            vp = v.reshape(bs, max_q, hkv, d).transpose(1, 2)
        else:
            qp = q.view(-1, hq, d)[md.q_index].transpose(1, 2)
            kp = k.view(-1, hkv, d)[md.q_index].transpose(1, 2)
            vp = v.view(-1, hkv, d)[md.q_index].transpose(1, 2)
        if hq != hkv:
            kp = kp.repeat_interleave(hq // hkv, dim=1)
            vp = vp.repeat_interleave(hq // hkv, dim=1)
        out, lse = sdpa_with_lse(qp, kp, vp, None, layer.scaling, causal=True)
        out = out.transpose(1, 2).reshape(bs * max_q, hq * d)
        if not md.uniform:
            out = out[md.out_index]
        if not return_lse:
            return out
        lse = lse.transpose(1, 2).reshape(bs * max_q, hq)
        return out, lse if md.uniform else lse[md.out_index]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, return_lse=False):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, return_lse)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, return_lse=False):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, return_lse)
