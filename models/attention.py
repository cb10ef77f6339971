"""Scaled dot-product attention as the encoder and the matching head compute it: fused
(`F.scaled_dot_product_attention`) or as explicit products, whichever is faster for the
device and dtype, and the additive bias that keeps attention off empty token slots."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           bias: Optional[torch.Tensor] = None, return_attn: bool = False,
           dropout_p: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention of q `[batch, H, M, Dh]` over k, v `[batch, H, N, Dh]`
    with an additive `bias` broadcast to `[batch, H, M, N]` -> (output `[batch, H, M, Dh]`,
    the attention weights `[batch, H, M, N]` if `return_attn`, in at least float32).
    Fused where that is faster
    (see `fused_attention_pays`) and the weights are not asked for, and always with
    attention dropout; else as explicit products."""
    if not return_attn and (dropout_p > 0 or fused_attention_pays(q)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                              scale=scale), None
    logits = (q @ k.transpose(-2, -1)).mul_(scale)  # [batch, H, M, N]
    if bias is not None:
        logits = logits + bias
    # in at least float32, rounded once to v's dtype for the product: PyTorch's bfloat16
    # CPU softmax computes the end of each row one element at a time, so rows shorter
    # than its 32-wide vectors (the temporal attention's frames) took 4 to 5 times as long
    attn = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return attn.to(v.dtype) @ v, attn if return_attn else None


def fused_attention_pays(q: torch.Tensor) -> bool:
    """Whether `F.scaled_dot_product_attention` beats the explicit products for queries
    like `q`. Not for bfloat16 / float16 on a CPU: PyTorch's fused CPU kernel runs them no
    faster than float32, while the batched products go at the reduced-precision GEMM rate
    (on a 2-core AVX512-BF16 EPYC, the fused kernel took 1.25x as long at 197 keys and 2 to
    3x at 20 to 100). The explicit form rounds the logits to the input dtype, as the
    original's attention does under autocast."""
    return q.device.type != "cpu" or q.dtype in (torch.float32, torch.float64)


def split_heads(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection `[batch, N, 3 * H * Dh]` -> q, k, v `[batch, H, N, Dh]`: views for
    the fused kernel, which reads them strided; one copy into place for the explicit
    products, where three separate copies (one of them transposing k) took three times
    as long."""
    batch, num_tokens, _ = qkv.shape
    qkv = qkv.view(batch, num_tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, batch, H, N, Dh]
    if not fused_attention_pays(qkv):
        qkv = qkv.contiguous()
    return qkv.unbind(0)


def live_key_bias(live: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias `[batch, 1, 1, N]`: 0 for live keys, -inf for empty slots.
    A row with no live key (only empty slots ask) attends to all, so it stays finite."""
    live = live | ~live.any(dim=-1, keepdim=True)
    bias = torch.zeros(live.shape, dtype=dtype, device=live.device).masked_fill(~live, -torch.inf)
    return bias[:, None, None, :]
