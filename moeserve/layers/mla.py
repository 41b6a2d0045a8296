"""Multi-head latent attention (DeepSeek-V2/V3): the paged cache holds one latent per token per layer.

Per token and layer the cache stores `[c_kv | k_pe]`: the RMS-normed compressed KV (kv_lora_rank values) and the
roped key shared by all heads (qk_rope_head_dim values) - never expanded K/V. kv_b_proj holds, per head h,
W_UK[h] [nope, R] and W_UV[h] [v, R], and

    score(i, j) = q_nope[i,h] . (W_UK[h] c_j) + q_pe[i,h] . k_pe[j]  =  (W_UK[h]^T q_nope[i,h]) . c_j + q_pe . k_pe
    out[i, h]   = W_UV[h] sum_j p_ij c_j

Prefill expands the context's latents to per-head K/V (many queries share them). Decode absorbs W_UK into the
query and applies W_UV after attending in latent space: it reads only the latents, like MQA with one 576-wide
key whose first 512 values are also the value.

CUDA tensors go to moeserve.kernels.mla_decode (decode) and moeserve.kernels.mla_prefill (prefill: varlen causal
flash attention over the contexts expanded chunk by chunk); CPU tensors take the reference path here, exact in fp32.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeserve.distributed.parallel_state import get_tp_group
from moeserve.kernels.runtime import upload
from moeserve.layers.attention import AttentionMetadata, ForwardContext
from moeserve.layers.linear import divide


def rope_and_norm_latent(rotary, kv_norm, positions: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                         nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, nope + rope] -> its rope part roped, [T, H, rope] contiguous; kv [T, R + rope] (kv_a's output) ->
    the latent [kv_norm(c_kv) | rope(k_pe)] that the cache keeps. CUDA: one kernel (kernels/mla_rope)."""
    P = rotary.rotary_dim
    if q.is_cuda:
        from moeserve.kernels.mla_rope import mla_rope_norm

        cos, sin = rotary._cos_sin(q.device)
        return mla_rope_norm(q, kv, positions, cos, sin, kv_norm.weight, kv_norm.eps, nope_dim, rotary.interleaved)
    c_kv, k_pe = kv.split([kv.shape[-1] - P, P], dim=-1)
    q_pe, k_pe = rotary(positions, q[..., nope_dim:], k_pe.unsqueeze(1))
    return q_pe.contiguous(), torch.cat([kv_norm(c_kv), k_pe.squeeze(1)], dim=-1)


def split_kv_b(kv_b_weight: torch.Tensor, num_heads: int, nope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight [H*(nope+v), R] -> views W_UK [H, nope, R], W_UV [H, v, R] (no copies)."""
    w = kv_b_weight.view(num_heads, -1, kv_b_weight.shape[-1])
    return w[:, :nope_dim], w[:, nope_dim:]


class LatentAttention(nn.Module):
    """The MLA front: write this step's latents into the paged cache, attend over each sequence's latents.
    num_heads is the model's; this rank attends with its 1/TP of them (the kv_b_proj rows it is handed)."""

    # Mixed batches are planned on the host (which sequences decode, how prefill contexts are chunked): a CUDA graph
    # of a mixed batch cuts around this front (engine/piecewise), which then runs eagerly with the step's lengths.
    graph_safe_mixed = False

    def __init__(self, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads = divide(num_heads, get_tp_group().size, "attention heads")  # this rank's heads
        self.kv_lora_rank = kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.scale = scale
        self.layer_idx = layer_idx
        # Per-tensor scale of an fp8 latent cache (stored = latent / kv_scale, read = stored * kv_scale), one for
        # c_kv and k_pe alike: a host float (CUDA graphs capture it as a constant); 1.0 (vLLM's default without
        # calibration); layers.attention.load_kv_scale sets a checkpoint's k_scale.
        self.kv_scale = 1.0

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, kv_b_weight: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """q_nope [T, H, nope], q_pe [T, H, rope] (roped), latent [T, R + rope] -> [T, H, v]."""
        if ctx.kv_caches is None:  # memory profiling: no cache yet, attend within the new tokens only
            w_uk, w_uv = split_kv_b(kv_b_weight, self.num_heads, self.nope_dim)
            return self._attend_uncached(q_nope, q_pe, latent, w_uk, w_uv, ctx.attn)
        if ctx.cuts is not None and ctx.attn.max_query_len > 1:  # a mixed batch in a piecewise CUDA graph
            return ctx.cuts.cut(partial(self._cached, kv_b_weight=kv_b_weight), (q_nope, q_pe, latent),
                                (self.num_heads, self.v_dim), q_nope.dtype)
        return self._cached(q_nope, q_pe, latent, kv_b_weight=kv_b_weight, ctx=ctx)

    def _cached(self, q_nope, q_pe, latent, *, kv_b_weight, ctx: ForwardContext, out=None) -> torch.Tensor:
        """Write the step's latents, then attend over the cache (into `out` when given)."""
        w_uk, w_uv = split_kv_b(kv_b_weight, self.num_heads, self.nope_dim)
        meta = ctx.attn
        cache = ctx.kv_caches[self.layer_idx]
        if q_nope.is_cuda:
            from moeserve.kernels.mla_decode import write_latent_cache

            write_latent_cache(latent, cache, meta.slot_mapping, self.kv_scale)
            if meta.max_query_len == 1:  # pure decode: graph-safe, no host reads (never a cut: no `out`)
                return self._decode(q_nope, q_pe, cache, meta.seq_lens, meta.block_tables, w_uk, w_uv,
                                    meta.max_seq_len)
        else:
            write_latent_reference(latent, cache, meta.slot_mapping, self.kv_scale)
        return self._attend_mixed(q_nope, q_pe, cache, w_uk, w_uv, meta, out)

    # -- decode: absorbed, over the latent cache --
    def _decode(self, q_nope, q_pe, cache, seq_lens, block_tables, w_uk, w_uv, max_seq_len) -> torch.Tensor:
        """One query per sequence (row b of q belongs to sequence b, at its last position)."""
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]
        if q_nope.is_cuda:
            from moeserve.kernels.mla_decode import mla_decode

            o_lat = mla_decode(q_lat, q_pe, cache, seq_lens=seq_lens, block_tables=block_tables, scale=self.scale,
                               max_seq_len=max_seq_len, kv_scale=self.kv_scale)
        else:
            o_lat = mla_decode_reference(q_lat, q_pe, cache, seq_lens=seq_lens, block_tables=block_tables,
                                         scale=self.scale, kv_scale=self.kv_scale)
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]

    # -- mixed batches: decodes absorbed, prefills expanded --
    def _attend_mixed(self, q_nope, q_pe, cache, w_uk, w_uv, meta: AttentionMetadata, out=None) -> torch.Tensor:
        if meta.mla_plan is None:  # the same in every layer of the step: planned once, by the first layer
            meta.mla_plan = MixedPlan(meta, cache.shape[1], q_nope.device)
        plan = meta.mla_plan
        if out is None:
            out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)
        if plan.dec_tok is not None:
            tok = plan.dec_tok
            out[tok] = self._decode(q_nope[tok], q_pe[tok], cache, plan.dec_seq_lens, plan.dec_tables, w_uk, w_uv,
                                    plan.dec_max_len)
        if plan.pre_tok is not None:
            tok = plan.pre_tok
            pages = cache[plan.page_ids]  # [sum n_pages, bs, R+rope]
            if pages.dtype == torch.float8_e4m3fn:  # an fp8 cache: the expansion reads dequantized latents
                from moeserve.kernels.reference import kv_load
                pages = kv_load(pages, q_nope.dtype, self.kv_scale)
            if isinstance(tok, slice):  # one run of rows: views in, the kernel writes its rows of `out` in place
                self._expanded(q_nope[tok], q_pe[tok], pages, plan.n_pages, plan.q_lens, plan.ctx_lens, w_uk, w_uv,
                               plan, out=out[tok])
            else:
                out[tok] = self._expanded(q_nope[tok], q_pe[tok], pages, plan.n_pages, plan.q_lens, plan.ctx_lens,
                                          w_uk, w_uv, plan)
        return out

    def _attend_uncached(self, q_nope, q_pe, latent, w_uk, w_uv, meta: AttentionMetadata) -> torch.Tensor:
        qsl = meta.query_start_loc_cpu
        q_lens = np.diff(qsl)
        pages = latent.unsqueeze(1)  # one token per page: the new tokens are their own context
        return self._expanded(q_nope, q_pe, pages, q_lens, q_lens, q_lens, w_uk, w_uv)

    def _expanded(self, q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv, plan=None,
                  out=None) -> torch.Tensor:
        """Causal attention of each sequence's queries over its context, expanded to per-head K/V.

        pages [P, page, R+rope] hold the sequences' contexts one after the other: sequence i owns n_pages[i]
        pages, its ctx_lens[i] tokens come first in them, and its q_lens[i] queries are its last tokens.
        plan: the step's MixedPlan, which keeps the chunks' device arguments for the next layers.
        out: [T, H, v] to write into (else a new tensor); returned either way."""
        if pages.is_cuda:
            return self._expanded_cuda(q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv, plan, out)
        if out is None:
            out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)
        page0 = q0 = 0
        for n_p, n_q, n_ctx in zip(n_pages.tolist(), q_lens.tolist(), ctx_lens.tolist()):
            context = pages[page0:page0 + n_p].flatten(0, 1)[:n_ctx]
            s = slice(q0, q0 + n_q)
            out[s] = expanded_attention(q_nope[s], q_pe[s], context, w_uk, w_uv, self.scale)
            page0, q0 = page0 + n_p, q0 + n_q
        return out

    # Bytes of expanded K/V (k_nope | v, all local heads) held at once: contexts longer than this are attended chunk
    # by chunk and merged by log-sum-exp. 256 MiB is 32k tokens of deepseek-v2-lite (16 heads x 256 x 2 bytes),
    # so common prompts and cached prefixes go in one pass that reads the pages in place (on 2xH200, 2048 new
    # tokens on an 8192-token prefix took 1.43 ms in two 8192-token chunks, 1.00 ms in the old single pass).
    prefill_bytes = 256 << 20
    prefill_chunk: int | None = None  # tokens per chunk; None: from prefill_bytes (tests set it)

    def _chunk_tokens(self, itemsize: int) -> int:
        if self.prefill_chunk is not None:
            return int(self.prefill_chunk)
        return max(4096, self.prefill_bytes // (self.num_heads * (self.nope_dim + self.v_dim) * itemsize))

    def _expanded_cuda(self, q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv, plan=None,
                       out=None) -> torch.Tensor:
        """The contexts' latents (contiguous per sequence in the flattened pages) expanded chunk by chunk with one
        GEMM (c @ kv_b_proj^T -> [S, H, nope + v]; k_nope and v are strided views of it, k_pe is read from the
        latents) and attended by moeserve.kernels.mla_prefill, a varlen causal flash attention that keeps the
        192-wide key and 128-wide value apart. Chunks after the first are merged by log-sum-exp."""
        from moeserve.kernels.mla_prefill import merge_partials, mla_prefill_attention

        H, N, V, R = self.num_heads, self.nope_dim, self.v_dim, self.kv_lora_rank
        flat = pages.flatten(0, 1)  # [P*page, R+rope]
        w = _kv_b_full(w_uk, w_uv).reshape(H * (N + V), R)
        chunk = self._chunk_tokens(w.element_size())
        chunks = None if plan is None else plan.chunks.get(chunk)
        if chunks is None:
            chunks = prefill_chunks(chunk, n_pages, q_lens, ctx_lens, pages.shape[1], q_nope.device)
            if plan is not None:
                plan.chunks[chunk] = chunks
        merged = lse = None
        for rows, args in chunks:
            lat = flat if rows is None else flat[rows]
            kv = (lat[:, :R].to(w.dtype) @ w.t()).view(-1, H, N + V)
            k_pe = lat[:, R:].to(w.dtype)
            if len(chunks) == 1:
                return mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], scale=self.scale,
                                             out=out, **args)
            lse_c = torch.empty(q_nope.shape[0], H, dtype=torch.float32, device=q_nope.device)
            o_c = mla_prefill_attention(q_nope, q_pe, kv[..., :N], k_pe, kv[..., N:], lse=lse_c, scale=self.scale,
                                        **args)
            merged, lse = (o_c, lse_c) if merged is None else merge_partials(merged, lse, o_c, lse_c)
        if out is None:
            return merged
        return out.copy_(merged)

    def _expanded_cuda_paged(self, q_nope, q_pe, pages, n_pages, q_lens, ctx_lens, w_uk, w_uv) -> torch.Tensor:
        """The former prefill path, kept as the baseline of benchmarks/kernels/bench_kernels.py (mla_prefill): expand
        all pages to a [2, P, page, H, D] K/V cache (D = max(qk, v), zero padded; the kernel pads D to a power of
        two, 256 for DeepSeek) and run the paged attention kernel over it."""
        from moeserve.kernels.attention import paged_attention

        dev, H, N, P, V, R = q_nope.device, self.num_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank
        D = max(N + P, V)
        num_pages, page = pages.shape[:2]
        c, k_pe = pages[..., :R].reshape(-1, R), pages[..., R:].reshape(-1, 1, P)
        kv = pages.new_zeros(2, num_pages * page, H, D)
        kv[0, :, :, :N] = torch.einsum("tr,hnr->thn", c, w_uk)
        kv[0, :, :, N:N + P] = k_pe
        kv[1, :, :, :V] = torch.einsum("tr,hvr->thv", c, w_uv)
        q = q_nope.new_zeros(q_nope.shape[0], H, D)
        q[..., :N], q[..., N:N + P] = q_nope, q_pe
        first_page = np.concatenate([[0], np.cumsum(n_pages)[:-1]])
        tables = first_page[:, None] + np.minimum(np.arange(int(n_pages.max()))[None, :], n_pages[:, None] - 1)
        qsl = np.concatenate([[0], np.cumsum(q_lens)])

        def up(a):
            return upload(np.ascontiguousarray(a, dtype=np.int32), dev)

        o = paged_attention(q, kv.view(2, num_pages, page, H, D), query_start_loc=up(qsl), seq_lens=up(ctx_lens),
                            block_tables=up(tables), scale=self.scale, max_query_len=int(q_lens.max()),
                            max_seq_len=int(ctx_lens.max()))
        return o[..., :V]


class MixedPlan:
    """Where a mixed batch's decodes and prefills are, as the MLA layers need it: which token rows decode (and
    their sequences' lengths and block tables), which prefill, and the cache pages of the prefilling sequences'
    contexts in order. The same in every layer of a step: built once (host planning and uploads), kept on the
    step's AttentionMetadata, with the prefill attention's per-chunk arguments (`chunks`, by chunk size)."""

    def __init__(self, meta: AttentionMetadata, block_size: int, device: torch.device):
        self.dec_tok = self.pre_tok = None
        self.chunks: dict[int, list] = {}
        qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        q_lens = np.diff(qsl)
        dec = np.flatnonzero(q_lens == 1)
        if dec.size:
            self.dec_tok = upload(qsl[dec].astype(np.int64), device)
            rows = upload(dec.astype(np.int64), device)
            self.dec_seq_lens, self.dec_tables = meta.seq_lens[rows], meta.block_tables[rows]
            self.dec_max_len = int(seq_lens[dec].max())
        pre = np.flatnonzero(q_lens > 1)
        if pre.size:
            if qsl[pre[-1] + 1] - qsl[pre[0]] == q_lens[pre].sum():  # one run of rows (as the scheduler orders them)
                self.pre_tok = slice(int(qsl[pre[0]]), int(qsl[pre[-1] + 1]))
            else:
                self.pre_tok = upload(np.concatenate([np.arange(qsl[b], qsl[b + 1]) for b in pre]), device)
            self.q_lens, self.ctx_lens = q_lens[pre], seq_lens[pre]
            self.n_pages = -(-self.ctx_lens // block_size)
            tables = meta.block_tables[upload(pre.astype(np.int64), device)]
            take = np.concatenate([i * tables.shape[1] + np.arange(n) for i, n in enumerate(self.n_pages)])
            self.page_ids = tables.reshape(-1)[upload(take, device)].long()


def prefill_chunks(chunk: int, n_pages, q_lens, ctx_lens, page: int, device: torch.device) -> list:
    """[(latent rows to gather, or None for the pages in place; mla_prefill_attention's arguments)], one per chunk
    of `chunk` context tokens, for sequences laid out as LatentAttention._expanded describes."""

    def up(a):
        return upload(np.ascontiguousarray(a, dtype=np.int32), device)

    first_tok = np.concatenate([[0], np.cumsum(n_pages)[:-1]]) * page
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    q_start_d, q_len_d, max_q = up(q_start), up(q_lens), int(q_lens.max())
    n_chunks = -(-int(ctx_lens.max()) // chunk)
    out = []
    for ci in range(n_chunks):
        c0 = ci * chunk
        k_len = np.clip(ctx_lens - c0, 0, chunk)
        if n_chunks == 1:  # each context starts its sequence's pages: read them in place, no gather
            k_start, rows = first_tok, None
        else:
            k_start = np.concatenate([[0], np.cumsum(k_len)[:-1]])
            rows = upload(np.concatenate([first_tok[i] + c0 + np.arange(n) for i, n in enumerate(k_len)])
                          .astype(np.int64), device)
        out.append((rows, dict(q_start=q_start_d, q_len=q_len_d, k_start=up(k_start), k_len=up(k_len),
                               q_off=up(ctx_lens - q_lens - c0), max_q_len=max_q)))
    return out


# ---------------------------------------------------------------------------------------------- references
def _kv_b_full(w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """[H, nope + v, R]: the kv_b_proj weight that split_kv_b's two views came from (no copy), or their
    concatenation when they are separate tensors."""
    H, N, R = w_uk.shape
    V = w_uv.shape[1]
    st = ((N + V) * R, R, 1)
    if (w_uk.stride() == st and w_uv.stride() == st and w_uk.untyped_storage().data_ptr() == w_uv.untyped_storage().data_ptr()
            and w_uv.data_ptr() == w_uk.data_ptr() + N * R * w_uk.element_size()):
        return w_uk.as_strided((H, N + V, R), st)
    return torch.cat([w_uk, w_uv], dim=1)


def write_latent_reference(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                           kv_scale: float = 1.0) -> None:
    """cache[slot // page, slot % page] = latent row, for every token with slot >= 0. cache [blocks, page, L]
    (an fp8 cache holds latent / kv_scale: kernels.reference.kv_store)."""
    from moeserve.kernels.reference import kv_store

    keep = slot_mapping >= 0
    kv_store(cache.view(-1, cache.shape[-1]), slot_mapping[keep], latent[keep], kv_scale)


def expanded_attention(q_nope, q_pe, context, w_uk, w_uv, scale: float) -> torch.Tensor:
    """n_q queries (the last n_q positions of the context) over context [n_ctx, R+rope], via per-head K/V."""
    R = w_uk.shape[-1]
    c, k_pe = context[:, :R], context[:, R:]
    H = q_nope.shape[1]
    k = torch.cat([torch.einsum("tr,hnr->thn", c, w_uk), k_pe[:, None, :].expand(-1, H, -1)], dim=-1)
    v = torch.einsum("tr,hvr->thv", c, w_uv)
    q = torch.cat([q_nope, q_pe], dim=-1)
    n_q, n_k = q.shape[0], k.shape[0]
    visible = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible,
                                       scale=scale)
    return o.transpose(0, 1)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, *, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, kv_scale: float = 1.0, **_unused) -> torch.Tensor:
    """Absorbed decode: o_lat[b, h] = softmax_j((q_lat[b,h] . c_j + q_pe[b,h] . k_pe_j) * scale) c_j over the
    seq_lens[b] cached tokens of sequence b. q_lat [B, H, R], q_pe [B, H, rope], cache [blocks, page, R+rope].

    The semantics moeserve.kernels.mla_decode is tested against; fp32 (fp64 stays fp64) inside."""
    from moeserve.kernels.reference import kv_load

    R = q_lat.shape[-1]
    page = cache.shape[1]
    acc = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    lens = seq_lens.tolist()
    tables = block_tables.long().cpu()
    out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    for b, n in enumerate(lens):
        context = kv_load(cache[tables[b, : -(-n // page)].to(cache.device)].flatten(0, 1)[:n], acc,
                          kv_scale)  # [n, R+rope], an fp8 cache dequantized
        scores = (q_lat[b].to(acc) @ context[:, :R].t() + q_pe[b].to(acc) @ context[:, R:].t()) * scale  # [H, n]
        out[b] = (scores.softmax(dim=-1) @ context[:, :R]).to(q_lat.dtype)
    return out
