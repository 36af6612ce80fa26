"""The Dante transformer: a decoder-only LLaMA-style model, pure math (torch only).

Architecture (stage 4 trains it, 5 extends it, 7 fine-tunes it, 8 evaluates it, 9 exports it):
token embedding -> n_layers x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU -> residual] -> final RMSNorm. ``forward`` returns the normed hidden states; logits
are ``model.output(hidden)`` (or ``model.logits``), and training uses ``dante.loss`` on the hidden
states and ``model.output.weight`` so full fp32 logits are never built.

Design choices
- Meta-LLaMA parameter names (``tok_embeddings``, ``layers.{i}.attention.{wq,wk,wv,wo}``,
  ``layers.{i}.feed_forward.{w1,w2,w3}``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``); the one
  table to Hugging Face names is ``dante.export.hf_format.HF_NAME_MAP``. No biases. No fused QKV (names must stay).
- RoPE in the rotate-half layout (see ``dante/rope.py``): export needs no wq/wk permutation. The cos/sin
  table is a non-persistent fp32 buffer built from the config (theta, rope_scaling, max_seq_len), so a
  checkpoint never carries it and stage 5 changes the scaling by building a new model from a new config.
- SwiGLU hidden width (``ffn_hidden_dim_of``): ``ffn_hidden_dim`` when set, else LLaMA's rule
  round_up(multiple_of, int(ffn_dim_multiplier * int(2 * 4 * dim / 3))). dante-2b: dim 2560 -> 6912.
- RMSNorm in fp32 then cast back to the input dtype, then times the weight (LLaMA / transformers order).
- Tied embeddings: ``output.weight is tok_embeddings.weight`` when ``tie_embeddings`` (both names appear in
  ``state_dict``; they are one tensor).
- Init (``init_weights``): every linear and the embedding ~ N(0, init_std); the two projections that write
  into the residual stream (``wo`` and ``w2``) use init_std / sqrt(2 * n_layers) so the residual variance
  stays O(1) with depth (GPT-2 / Megatron scaled init); norms start at 1.
- Attention
  * plain causal: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (Flash / cuDNN on
    GPU). enable_gqa rather than repeating K/V heads: on CPU (1 thread, B4 H8 Hkv2 T512 D64, fwd+bwd,
    median of 10) 182 ms vs 188 ms with repeat_interleave, and it never copies K/V.
  * packed documents (``doc_ids_BT``): causal AND same-document mask, via SDPA with an explicit boolean
    (B, 1, T, T) mask (``doc_attention = "sdpa"``, the default) or via FlexAttention with a BlockMask,
    which skips fully masked blocks (``"flex"``). Which one runs is decided outside, from the device,
    GQA and compile, by ``dante.kernels.choose_attention``, which also sets the functions used
    (``block_mask_fn``, per layer ``flex_attention``, possibly compiled ones) and ``repeat_kv`` (K/V heads
    repeated before a masked SDPA call); these are plain attributes, never config or state: they change
    speed and memory, never the result (tests check the paths agree). Positions restart per document
    (``positions_from_doc_ids``) unless ``positions_BT`` is given.
  * KV cache (``KVCache``): prefill then one-token steps for generation (stage 8); keys/values are
    stored after RoPE, one (B, n_kv_heads, max_len, head_dim) buffer per layer.

Example::

    model = Transformer(ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=8192))
    hidden_BTD = model(tokens_BT)
    logits_BTV = model.logits(hidden_BTD)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dante.config import ModelConfig
from dante.rope import apply_rotary, rope_inv_freq, rope_table

try:  # FlexAttention exists from torch 2.5; without it the SDPA mask path does the same math.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = create_block_mask = flex_attention = None


def head_dim_of(cfg: ModelConfig) -> int:
    """Per-head width: cfg.head_dim, or dim // n_heads when 0."""
    return cfg.head_dim or cfg.dim // cfg.n_heads


def ffn_hidden_dim_of(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: cfg.ffn_hidden_dim, or LLaMA's 8/3 * dim rule rounded up to multiple_of."""
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(cfg.ffn_dim_multiplier * int(2 * 4 * cfg.dim / 3))
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count; a tied embedding/output matrix counts once."""
    return sum(p.numel() for p in model.parameters())


def positions_from_doc_ids(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its (contiguous) document: 0 at every document start."""
    T = doc_ids_BT.shape[1]
    index_BT = torch.arange(T, device=doc_ids_BT.device).expand_as(doc_ids_BT)
    is_start_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    is_start_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    start_BT = torch.where(is_start_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values
    return index_BT - start_BT


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True where query t may attend key s: s <= t and same document."""
    T = doc_ids_BT.shape[1]
    index_T = torch.arange(T, device=doc_ids_BT.device)
    causal_TT = index_T[:, None] >= index_T[None, :]
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (causal_TT & same_doc_BTT)[:, None]


def document_block_mask(doc_ids_BT: torch.Tensor, block_mask_fn=create_block_mask):
    """FlexAttention BlockMask for causal AND same-document attention (heads share it).

    block_mask_fn: ``create_block_mask`` or a compiled version of it (dante.kernels).
    """

    def causal_same_doc(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids_BT[b, q_idx] == doc_ids_BT[b, kv_idx])

    B, T = doc_ids_BT.shape
    return block_mask_fn(causal_same_doc, B, None, T, T, device=doc_ids_BT.device)


class KVCache:
    """Keys and values of past tokens for incremental decoding: per layer (B, n_kv_heads, max_len, head_dim).

    ``length`` tokens are cached; ``Transformer.forward(tokens, kv_cache=cache)`` appends its T tokens at
    positions length .. length+T-1 and advances ``length``. All rows share ``length`` (same-length
    prompts, or left-aligned batches decoded in lockstep).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, head_dim_of(cfg))
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values and return all cached ones (B, Hkv, length+T, D), as views."""
        end = self.length + k_BHTD.shape[2]
        self.keys[layer][:, :, self.length:end] = k_BHTD
        self.values[layer][:, :, self.length:end] = v_BHTD
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 mean-of-squares loses ~3 digits at d_model 2560 (LLaMA does the same).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def attend(q_BHTD, k_BHSD, v_BHSD, mask, is_causal: bool, repeat_kv: bool = False,
           flex=flex_attention) -> torch.Tensor:
    """Scaled dot-product attention; mask is None, a boolean (B|1, 1, T, S) tensor or a flex BlockMask.

    repeat_kv: with a boolean mask, repeat each K/V head for its query heads instead of SDPA's enable_gqa
    (on CUDA the kernels that take a mask do not take GQA broadcast; see dante/kernels.py).
    flex: the FlexAttention function for a BlockMask (the eager op, or a compiled one).
    """
    gqa = q_BHTD.shape[1] != k_BHSD.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex(q_BHTD, k_BHSD, v_BHSD, block_mask=mask, enable_gqa=gqa)
    if gqa and repeat_kv and mask is not None:
        group = q_BHTD.shape[1] // k_BHSD.shape[1]  # kv head j serves query heads j*group .. j*group+group-1
        k_BHSD, v_BHSD = k_BHSD.repeat_interleave(group, dim=1), v_BHSD.repeat_interleave(group, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, head_dim_of(cfg)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # How a masked call runs (see ``attend``); set by dante.kernels.apply_attention_choice.
        self.repeat_kv = False
        self.flex_attention = flex_attention

    def forward(self, x_BTD, cos, sin, mask, is_causal: bool, kv_cache: KVCache | None, layer: int):
        B, T, _ = x_BTD.shape
        xq_BTHD = apply_rotary(self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim), cos, sin)
        xk_BTHD = apply_rotary(self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        xv_BTHD = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        # (B, H, T, D) views: SDPA kernels take strided inputs, so no copy here.
        q_BHTD, k_BHTD, v_BHTD = xq_BTHD.transpose(1, 2), xk_BTHD.transpose(1, 2), xv_BTHD.transpose(1, 2)
        if kv_cache is not None:
            k_BHTD, v_BHTD = kv_cache.update(layer, k_BHTD, v_BHTD)
        out_BHTD = attend(q_BHTD, k_BHTD, v_BHTD, mask, is_causal, self.repeat_kv, self.flex_attention)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim_of(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x_BTD, cos, sin, mask=None, is_causal: bool = True, kv_cache=None, layer: int = 0):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos, sin, mask, is_causal, kv_cache, layer)
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        half = head_dim_of(cfg) // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)
        # How document-masked attention runs: "sdpa" (dense boolean mask) or "flex" (BlockMask built by
        # block_mask_fn). Plain attributes, not config: set by dante.kernels.apply_attention_choice.
        self.doc_attention = "sdpa"
        self.block_mask_fn = create_block_mask
        self.init_weights()

    def init_rope(self) -> None:
        """(Re)build the cos/sin tables from the config, in fp32 (needed after ``to_empty`` from meta)."""
        inv_freq_K, scaling = rope_inv_freq(head_dim_of(self.cfg), self.cfg.rope_theta, self.cfg.rope_scaling,
                                            device=self.rope_cos.device)
        cos_LK, sin_LK = rope_table(inv_freq_K, self.cfg.max_seq_len, scaling)
        self.rope_cos = cos_LK
        self.rope_sin = sin_LK

    def materialize(self, device: torch.device | str) -> "Transformer":
        """Real (uninitialized) storage for a model built on the meta device; load weights or init_weights next.

        ``nn.Module.to_empty`` gives each module its own new tensor, which silently unties output from
        tok_embeddings; this re-ties them and rebuilds the RoPE tables (never part of a state dict).
        """
        self.to_empty(device=device)
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_rope()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights (scaled init, see the module docstring) and the RoPE tables."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for block in self.layers:
            for linear in (block.attention.wq, block.attention.wk, block.attention.wv,
                           block.feed_forward.w1, block.feed_forward.w3):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(block.attention.wo.weight, std=residual_std)
            nn.init.normal_(block.feed_forward.w2.weight, std=residual_std)
            nn.init.ones_(block.attention_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        self.init_rope()

    def forward(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                doc_ids_BT: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (B, T, dim) after the final norm.

        positions_BT: RoPE position of each token (default: 0..T-1, or restarting per document when
        doc_ids_BT is given, or continuing the cache). doc_ids_BT: document id per token; attention then
        stays inside each document. kv_cache: append these tokens to the cache and attend to all of it.
        """
        T = tokens_BT.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"{start + T} positions exceed model.max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None and doc_ids_BT is not None:
            raise ValueError("doc_ids_BT with a kv_cache is not supported: decode one document per row")
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KVCache holds {kv_cache.max_len} tokens; {start} cached + {T} new do not fit")

        if positions_BT is None and doc_ids_BT is not None:
            positions_BT = positions_from_doc_ids(doc_ids_BT)
        if positions_BT is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D/2)
        else:
            cos, sin = self.rope_cos[positions_BT], self.rope_sin[positions_BT]  # (B, T, D/2)

        mask, is_causal = self._attention_mask(T, start, doc_ids_BT, tokens_BT.device)
        h_BTD = self.tok_embeddings(tokens_BT)
        for i, layer in enumerate(self.layers):
            h_BTD = layer(h_BTD, cos, sin, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(h_BTD)

    def _attention_mask(self, T: int, start: int, doc_ids_BT, device):
        """(mask, is_causal) shared by all layers of one forward."""
        if doc_ids_BT is not None:
            if self.doc_attention == "flex":
                if self.block_mask_fn is None:
                    raise ValueError("doc_attention='flex' but this torch build has no FlexAttention; use 'sdpa'")
                return document_block_mask(doc_ids_BT, self.block_mask_fn), False
            if self.doc_attention != "sdpa":
                raise ValueError(f"doc_attention={self.doc_attention!r}: expected 'sdpa' or 'flex'")
            return document_mask(doc_ids_BT), False
        if start == 0:
            return None, True  # plain causal (also a cache prefill)
        if T == 1:
            return None, False  # one new token sees every cached one
        # Several new tokens after a cached prefix: query t (absolute start+t) sees keys 0..start+t.
        # (SDPA's is_causal aligns the mask top-left when T != S, which would be wrong here.)
        allowed_TS = torch.arange(start + T, device=device)[None, :] <= (start + torch.arange(T, device=device))[:, None]
        return allowed_TS, False

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, vocab) from hidden states; training uses dante.loss instead."""
        return self.output(hidden_BTD)
