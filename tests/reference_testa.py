"""A second, deliberately plain implementation of the TESTA video encoder, for tests.

It follows docs/computation.md step by step on the encoder's state dict: explicit
softmax attention, the reference's own token layouts, and every merge done with Python
loops over batches, frames and tokens. Slow, but nothing is shared with `models/`.
"""
import math
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def layer_norm(x: Tensor, sd: Dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def linear(x: Tensor, sd: Dict[str, Tensor], name: str) -> Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def attention(x: Tensor, sd: Dict[str, Tensor], name: str, heads: int,
              size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """x [n, N, D] -> (out [n, N, D], keys averaged over heads [n, N, Dh])."""
    n, N, D = x.shape
    qkv = linear(x, sd, f"{name}.qkv").reshape(n, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * (D // heads) ** -0.5
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, N, D)
    return linear(out, sd, f"{name}.proj"), k.mean(1)


def mode_smallest(values: List) -> object:
    """Most frequent value; among equally frequent ones the smallest."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def slow_matching(metric: Tensor, r: int, class_token: bool, protect_first: bool
                  ) -> Tuple[List[int], List[int], List[int], List[float]]:
    """metric [N, Dh] -> (A positions, best B slot of each A token, its score)."""
    N = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    set_a, set_b = list(range(0, N, 2)), list(range(1, N, 2))
    partner, score = [], []
    for i, a in enumerate(set_a):
        sims = [float(m[a] @ m[b]) for b in set_b]
        if protect_first and i == 0:
            sims = [-math.inf] * len(set_b)
        best = max(range(len(set_b)), key=lambda j: (sims[j], -j))
        partner.append(best)
        score.append(sims[best])
    return set_a, set_b, partner, score


def slow_merge(x: Tensor, size: Tensor, set_a: List[int], set_b: List[int], partner: List[int],
               score: List[float], r: int, keep_order: bool) -> Tuple[Tensor, Tensor]:
    """Merge the r best-scoring A tokens into their partners; size-weighted average.

    x [N, C], size [N]. Output: unmerged A tokens, then every B token."""
    order = sorted(range(len(set_a)), key=lambda i: -score[i])
    merged, unmerged = order[:r], order[r:]
    if keep_order:
        unmerged = sorted(unmerged)
    sums = [x[b] * size[b] for b in set_b]
    sizes = [size[b].clone() for b in set_b]
    for i in merged:
        sums[partner[i]] = sums[partner[i]] + x[set_a[i]] * size[set_a[i]]
        sizes[partner[i]] = sizes[partner[i]] + size[set_a[i]]
    rows = [x[set_a[i]] for i in unmerged] + [s / z for s, z in zip(sums, sizes)]
    new_size = [size[set_a[i]] for i in unmerged] + sizes
    return torch.stack(rows), torch.stack(new_size)


def merge_frames(frames: Tensor, size: Tensor, metric: Tensor, r: int, class_token: bool
                 ) -> Tuple[Tensor, Tensor]:
    """One video: frames [L, T, D], size [L, T], metric [L, T, Dh] -> T - r frames."""
    L, T, _ = frames.shape
    r = min(r, (T - int(class_token)) // 2)
    if r <= 0:
        return frames, size
    matches = [slow_matching(metric[l], r, class_token, False) for l in range(L)]
    set_a, set_b = matches[0][0], matches[0][1]
    # patch voting: every patch position follows the majority partner and modal score
    partner = [mode_smallest([m[2][i] for m in matches]) for i in range(len(set_a))]
    score = [mode_smallest([m[3][i] for m in matches]) for i in range(len(set_a))]
    out = [slow_merge(frames[l], size[l], set_a, set_b, partner, score, r, keep_order=True)
           for l in range(L)]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def merge_patches(tokens: Tensor, size: Tensor, metric: Tensor, r: int, class_token: bool
                  ) -> Tuple[Tensor, Tensor]:
    """One frame: tokens [1+L, D] (class token first), size [1+L] -> 1+L-r tokens."""
    r = min(r, (tokens.shape[0] - int(class_token)) // 2)
    if r <= 0:
        return tokens, size
    set_a, set_b, partner, score = slow_matching(metric, r, class_token, class_token)
    return slow_merge(tokens, size, set_a, set_b, partner, score, r, keep_order=class_token)


def reference_forward(sd: Dict[str, Tensor], video: Tensor, heads: int,
                      plan: List[Tuple[int, int]], class_token: bool = True,
                      prop_attn: bool = False) -> Tensor:
    """Divided space-time TESTA encoder. video [B, 3, T, H, W]; plan: (r_T, r_S) per block."""
    B, _, T, H, W = video.shape
    p = sd["patch_embed.proj.weight"].shape[-1]
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * T, 3, H, W)
    x = F.conv2d(frames, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)  # [(B*T), L, D]
    L, D = x.shape[1], x.shape[2]
    x = torch.cat([sd["cls_token"].expand(B * T, 1, D), x], dim=1) + sd["pos_embed"]
    time_embed = sd["time_embed"]
    if time_embed.shape[1] != T:
        time_embed = F.interpolate(time_embed.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
    cls = x[0:1, 0:1].expand(B, 1, D)
    # token 1 + l*T + t is patch l of frame t
    patches = x[:, 1:].reshape(B, T, L, D).permute(0, 2, 1, 3) + time_embed[:, None]
    x = torch.cat([cls, patches.reshape(B, L * T, D)], dim=1)
    size = torch.ones(B, T, 1 + L, dtype=x.dtype)

    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(num_blocks):
        blk = f"blocks.{i}"
        r_t, r_s = plan[i]
        # temporal attention
        xt = x[:, 1:].reshape(B * L, T, D)
        res, metric_t = attention(layer_norm(xt, sd, f"{blk}.temporal_norm1"), sd,
                                  f"{blk}.temporal_attn", heads)
        if f"{blk}.temporal_scaling" in sd:
            res = res * (torch.tanh(sd[f"{blk}.temporal_scaling"]) + 1)
        res = linear(res.reshape(B, L * T, D), sd, f"{blk}.temporal_fc")
        xt = x[:, 1:] + res
        if r_t > 0:
            metric_t = metric_t.reshape(B, L, T, -1)
            merged = [merge_frames(xt[b].reshape(L, T, D), size[b, :, 1:].T, metric_t[b], r_t,
                                   class_token) for b in range(B)]
            T = merged[0][0].shape[1]
            xt = torch.stack([m[0].reshape(L * T, D) for m in merged])
            size = torch.stack([torch.cat([torch.ones(T, 1, dtype=x.dtype), m[1].T], dim=1)
                                for m in merged])
        # spatial attention per frame
        xs = xt.reshape(B, L, T, D).permute(0, 2, 1, 3).reshape(B * T, L, D)
        xs = torch.cat([x[:, :1].repeat_interleave(T, dim=0), xs], dim=1)  # [(B*T), 1+L, D]
        attn_size = size.reshape(B * T, 1 + L) if prop_attn else None
        res, metric_s = attention(layer_norm(xs, sd, f"{blk}.norm1"), sd, f"{blk}.attn", heads,
                                  attn_size)
        cls = x[:, :1] + res[:, 0].reshape(B, T, D).mean(1, keepdim=True)
        y = xt + res[:, 1:].reshape(B, T, L, D).permute(0, 2, 1, 3).reshape(B, L * T, D)
        if r_s > 0:
            y = y.reshape(B, L, T, D)
            new_frames, new_sizes = [], []
            for b in range(B):
                for t in range(T):
                    tokens = torch.cat([cls[b], y[b, :, t]])  # [1+L, D]
                    tok, sz = merge_patches(tokens, size[b, t], metric_s[b * T + t], r_s, class_token)
                    new_frames.append(tok[1:])
                    new_sizes.append(sz)
            L = new_frames[0].shape[0]
            y = torch.stack(new_frames).reshape(B, T, L, D).permute(0, 2, 1, 3).reshape(B, L * T, D)
            size = torch.stack(new_sizes).reshape(B, T, 1 + L)
        x = torch.cat([cls, y], dim=1)
        h = layer_norm(x, sd, f"{blk}.norm2")
        x = x + linear(F.gelu(linear(h, sd, f"{blk}.mlp.fc1")), sd, f"{blk}.mlp.fc2")
    return layer_norm(x, sd, "norm")
