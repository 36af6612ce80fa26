"""Chunked cross-entropy over the output projection: the (tokens x vocab) fp32 logits never exist at once.

At dante-2b scale one micro-batch of 8 x 2048 tokens against a 65,536 vocabulary would need 4.3 GB of
fp32 logits, plus as much again for their gradient. ``chunked_cross_entropy`` takes the final hidden
states and the output weight instead, and walks the tokens in chunks of ``chunk_size``: per chunk it
forms the logits (matmul in the compute dtype, then fp32), their logsumexp, the loss, and right away the
gradient of the loss w.r.t. that chunk's hidden states and its share of the weight gradient. Peak extra
memory (for the --dry-run estimate), C = chunk_size, c = bytes of the compute dtype:
C*V*(4 + c) for one chunk's fp32 logits (reused in place as their gradient) and its compute-dtype copy,
plus V*D*(4 + 2c) for the fp32 weight-gradient accumulator, one chunk's product and the weight cast.
dante-2b, C 4096, bf16: 1.6 GB + 1.3 GB, against 4.3 GB for the fp32 logits alone of 8 x 2048 tokens.

Design choices
- Gradients are computed in forward (a custom ``torch.autograd.Function``; backward only scales them by
  the incoming gradient). This costs 3 matmuls per chunk in total, one fewer than recomputing the
  logits in backward. When no gradient is needed (evaluation, ``torch.no_grad``) the gradient work is
  skipped entirely.
- The function holds no state and no data-dependent Python control flow, so torch.compile traces it
  (the chunk loop unrolls over the static token count). The output weight is an ordinary tensor: with
  torchao float8 training, lm_head/``output`` is excluded from conversion and stays high precision, and
  the hidden states coming out of the final RMSNorm are plain tensors too.
- Compute dtype: the autocast dtype when autocast is on for the tensors' device (logits are then bf16
  matmuls, like ``F.linear`` under autocast), otherwise the hidden states' dtype. Softmax statistics are
  always fp32.
- Token weights: ``loss_weights_N`` are per-token float weights (SFT: assistant tokens 1, prompt tokens 0
  or less); ``targets == ignore_index`` always weighs 0. The function returns the weighted SUM of token
  losses and the sum of weights. Normalisation is the caller's: with gradient accumulation (and data
  parallelism) divide every micro-batch's loss sum by the weight total of the whole optimizer step, so
  each token counts the same whatever micro-batch it fell in (the per-micro-batch mean would over-weight
  tokens of sparsely-weighted micro-batches).

Tolerance (tests): equal to ``F.cross_entropy`` on full logits within 1e-5 relative in fp32, value and
gradients w.r.t. hidden states and weight.

Example::

    hidden_BTD = model(tokens_BT)
    loss_sum, weight_sum = chunked_cross_entropy(hidden_BTD.flatten(0, 1), model.output.weight,
                                                 targets_BT.flatten(), chunk_size=4096)
    (loss_sum / step_weight_total).backward()
"""

from __future__ import annotations

import torch


def _loss_and_grads(hidden_ND, weight_VD, targets_N, token_weights_N, chunk_size: int,
                    compute_dtype: torch.dtype, want_grad_hidden: bool, want_grad_weight: bool):
    """Weighted loss sum (fp32 scalar) and, if asked, d(loss sum)/d(hidden) and d(loss sum)/d(weight)."""
    N = hidden_ND.shape[0]
    weight_c_VD = weight_VD.to(compute_dtype)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
    grad_hidden_ND = torch.empty_like(hidden_ND) if want_grad_hidden else None
    grad_weight_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if want_grad_weight else None
    for begin in range(0, N, chunk_size):
        end = min(begin + chunk_size, N)
        h_c_CD = hidden_ND[begin:end].to(compute_dtype)
        logits_CV = (h_c_CD @ weight_c_VD.T).float()
        target_C1 = targets_N[begin:end, None]
        w_C = token_weights_N[begin:end]
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        loss_sum = loss_sum + ((lse_C - logits_CV.gather(1, target_C1).squeeze(1)) * w_C).sum()
        if not (want_grad_hidden or want_grad_weight):
            continue
        # d(w * (lse - logit[target]))/d(logits) = w * (softmax - onehot(target)); in place on the logits.
        dlogits_CV = logits_CV.sub_(lse_C[:, None]).exp_()
        dlogits_CV.scatter_add_(1, target_C1, torch.full_like(lse_C[:, None], -1.0))
        dlogits_CV.mul_(w_C[:, None])
        dlogits_c_CV = dlogits_CV.to(compute_dtype)
        if want_grad_hidden:
            grad_hidden_ND[begin:end] = dlogits_c_CV @ weight_c_VD
        if want_grad_weight:
            grad_weight_VD += (dlogits_c_CV.T @ h_c_CD).float()
    return loss_sum, grad_hidden_ND, grad_weight_VD


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, token_weights_N, chunk_size, compute_dtype,
                want_grad_hidden, want_grad_weight):
        loss_sum, grad_hidden_ND, grad_weight_VD = _loss_and_grads(
            hidden_ND, weight_VD, targets_N, token_weights_N, chunk_size, compute_dtype,
            want_grad_hidden, want_grad_weight)
        ctx.weight_dtype = weight_VD.dtype
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        if grad_hidden_ND is not None:
            grad_hidden_ND = grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype)
        if grad_weight_VD is not None:
            grad_weight_VD = (grad_weight_VD * grad_loss).to(ctx.weight_dtype)
        return grad_hidden_ND, grad_weight_VD, None, None, None, None, None, None


def chunked_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                          loss_weights_N: torch.Tensor | None = None, chunk_size: int = 4096,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of token losses, sum of token weights), both fp32 scalars; only the first has grad.

    hidden_ND: final hidden states, any leading shape (flattened to N rows). weight_VD: output projection
    (vocab, dim). targets_N: next-token ids, ``ignore_index`` for no loss. loss_weights_N: optional float
    weight per token (default 1).
    """
    D = hidden_ND.shape[-1]
    hidden_ND = hidden_ND.reshape(-1, D)
    targets_N = targets_N.reshape(-1)
    if weight_VD.dim() != 2 or weight_VD.shape[1] != D:
        raise ValueError(f"weight must be (vocab, {D}) to match the hidden states, got {tuple(weight_VD.shape)}")
    if targets_N.shape[0] != hidden_ND.shape[0]:
        raise ValueError(f"{targets_N.shape[0]} targets for {hidden_ND.shape[0]} hidden rows")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    keep_N = targets_N != ignore_index
    token_weights_N = keep_N.float()
    if loss_weights_N is not None:
        loss_weights_N = loss_weights_N.reshape(-1)
        if loss_weights_N.shape[0] != targets_N.shape[0]:
            raise ValueError(f"{loss_weights_N.shape[0]} loss weights for {targets_N.shape[0]} targets")
        token_weights_N = token_weights_N * loss_weights_N.float()
    safe_targets_N = torch.where(keep_N, targets_N, torch.zeros_like(targets_N))

    device_type = hidden_ND.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden_ND.dtype)
    grad_on = torch.is_grad_enabled()
    want_grad_hidden = grad_on and hidden_ND.requires_grad
    want_grad_weight = grad_on and weight_VD.requires_grad
    with torch.autocast(device_type, enabled=False):  # dtypes are explicit inside
        if want_grad_hidden or want_grad_weight:
            loss_sum = _ChunkedCrossEntropy.apply(hidden_ND, weight_VD, safe_targets_N, token_weights_N,
                                                  chunk_size, compute_dtype, want_grad_hidden, want_grad_weight)
        else:
            loss_sum = _loss_and_grads(hidden_ND, weight_VD, safe_targets_N, token_weights_N, chunk_size,
                                       compute_dtype, False, False)[0]
    return loss_sum, token_weights_N.sum()
