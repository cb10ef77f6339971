"""Text-guided token selection before cross-attention (config `text_guided_k`).

The video index is query-agnostic (the video's tokens are encoded once, without any
text), so a text can act on them only where the video-grounded text encoder reads them.
With selection on, each (text, video) pair cross-attends to k tokens of the video: the k
most relevant ones (the video's class token always among them), with every other token
merged, size-weighted, into its most similar kept token, so no content is dropped. That
is TESTA's importance rule (`models.aggregation.merge_least_important`: merge the least
important tokens into their most similar kept token, by cosine of the token features)
with an importance that the text gives:

- rule `text`: the attention the text pays each video token in the tower's first
  cross-attention layer (head-averaged softmax of the texts' queries against the video's
  keys, averaged over the text's words, padding left out);
- rule `similarity`, the text-agnostic control at the same k: a token's relevance is
  minus its highest cosine similarity to another token of the video, so the most
  distinct tokens are kept and the most redundant ones merged.

Every cached token has size 1; a merged token's size is the number of tokens it holds.
The cross-attention's key and value projections are affine and the merge weights of a
kept token sum to 1, so the keys and values of a merged token equal the merged keys and
values of its members: re-ranking projects one video's full tokens once per layer and
merges the projections per text (`merge_per_text`), which equals merging the tokens
first and running the encoder per pair.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from models.aggregation import SubsetMerge, merge_least_important

RULES = ("text", "similarity")
MATCHING_BYTES = 64 * 2**20  # what the selection of a chunk of texts (or videos) holds at once


def chunks(count: int, bytes_each: int) -> List[slice]:
    """Slices over `count` rows (texts or videos) of about `MATCHING_BYTES` each, at
    `bytes_each` per row (one row at least)."""
    size = max(1, MATCHING_BYTES // bytes_each)
    return [slice(start, start + size) for start in range(0, count, size)]


@dataclass(frozen=True)
class TokenSelection:
    """Cross-attend to `k` video tokens per pair, ranked by `rule` (one of `RULES`)."""
    k: int
    rule: str = "text"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"text_guided_k must be an int >= 1, got {self.k!r}")
        if self.rule not in RULES:
            raise ValueError(f"text_guided_rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    def check_tokens(self, num_tokens: int, video_mask: Optional[torch.Tensor]) -> None:
        """ValueError in one line where the video tokens cannot be reduced to k."""
        if self.k > num_tokens:
            raise ValueError(f"text_guided_k {self.k} is more than the {num_tokens} tokens a "
                             f"video has")
        if video_mask is not None:
            raise ValueError("text_guided_k needs videos without padded tokens (fixed "
                             "aggregation, testa_threshold: null)")


def selection_of(config) -> Optional[TokenSelection]:
    """The config's selection (`text_guided_k`, `text_guided_rule`), None when off."""
    if config["text_guided_k"] is None:
        return None
    return TokenSelection(config["text_guided_k"], config["text_guided_rule"])


def first_layer_queries(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> torch.Tensor:
    """The texts' states `[K, S, W]` where the first layer's cross-attention takes its
    queries from (embeddings, then that layer's self-attention), as `BlipTextModel` runs it."""
    text_bias = ((1.0 - attention_mask[:, None, None, :].to(encoder.dtype))
                 * torch.finfo(encoder.dtype).min)  # [K, 1, 1, S]
    hidden = encoder.embeddings(input_ids=input_ids)  # [K, S, W]
    return encoder.encoder.layer[0].attention(hidden, attention_mask=text_bias)[0]


def attention_relevance(cross, attended: torch.Tensor, keys: torch.Tensor,
                        attention_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Relevance `[K, N]` of video tokens to texts: the head-averaged attention of the
    cross-attention module `cross` from the texts' states `attended [K, S, W]` to the keys
    `[K or 1, N, W]` (already projected), averaged over the words of `attention_mask [K, S]`."""
    query = cross.query(attended).unflatten(-1, (heads, -1)).transpose(1, 2)  # [K, H, S, d]
    keys = keys.unflatten(-1, (heads, -1)).transpose(1, 2)  # [K or 1, H, N, d]
    num_texts, _, num_words, _ = query.shape
    relevance = []
    # texts in chunks: the float32 attention of one text is [H, S, N] (15 MB at 96 frames)
    for rows in chunks(num_texts, heads * num_words * keys.shape[2] * 4):
        chunk_keys = keys[rows] if len(keys) > 1 else keys
        scores = query[rows] @ chunk_keys.transpose(-1, -2) / query.shape[-1] ** 0.5  # [c, H, S, N]
        full = torch.promote_types(scores.dtype, torch.float32)  # bfloat16 under autocast
        attention = scores.softmax(dim=-1, dtype=full).mean(dim=1)  # [c, S, N]
        words = attention_mask[rows].to(attention)[:, :, None]  # [c, S, 1]
        relevance.append((attention * words).sum(dim=1) / words.sum(dim=1))  # [c, N]
    return torch.cat(relevance)


def similarity_relevance(video_embeds: torch.Tensor) -> torch.Tensor:
    """Relevance `[B, N]` without a text: minus each token's highest cosine similarity to
    another token of its video `[B, N, D]`. Videos go in chunks whose float32 cosine
    matrices `[c, N, N]` stay near `MATCHING_BYTES` (one video at 96 frames is 92 MB)."""
    num_tokens = video_embeds.shape[1]
    relevance = []
    for rows in chunks(len(video_embeds), num_tokens * num_tokens * 4):
        videos = video_embeds[rows]
        tokens = F.normalize(videos.to(torch.promote_types(videos.dtype, torch.float32)), dim=-1)
        cosine = tokens @ tokens.transpose(-1, -2)  # [c, N, N]
        cosine.diagonal(dim1=-2, dim2=-1).fill_(-2.0)  # a token is not its own neighbour
        relevance.append(-cosine.max(dim=-1).values)
    return torch.cat(relevance)


def choose_tokens(selection: TokenSelection, video_embeds: torch.Tensor,
                  relevance: torch.Tensor, num_texts: Optional[int] = None
                  ) -> Optional[SubsetMerge]:
    """The merge, for each of `num_texts` texts (default: a row of relevance each),
    keeping the `selection.k` most relevant tokens (`relevance [K or 1, N]`) of the videos
    `[K or 1, N, D]`, class token (position 0) included, the others merged into their most
    similar kept token by cosine of the token features; None when k is all. One row of
    relevance for one video (the text-agnostic rule) is one choice, matched once and
    shared by all the texts. Texts go in chunks: the matching holds float32 features
    `[chunk, N, D]`, which for all K texts of one video at 96 frames would be about 1 GB."""
    num_rows, num_tokens = relevance.shape
    num_texts = num_rows if num_texts is None else num_texts
    if num_rows < num_texts:
        merge = choose_tokens(selection, video_embeds, relevance)
        return None if merge is None else SubsetMerge(*(
            indices.expand(num_texts, -1, -1)
            for indices in (merge.keep_idx, merge.src_idx, merge.dst_idx)))
    merges = []
    for rows in chunks(num_texts, num_tokens * video_embeds.shape[-1] * 4):
        texts = relevance[rows]  # [c, N]
        videos = video_embeds[rows] if len(video_embeds) > 1 else video_embeds
        merges.append(merge_least_important(videos.expand(len(texts), -1, -1), texts,
                                            num_tokens - selection.k, protect_first=True,
                                            share_over_patches=False))
    if merges[0] is None or len(merges) == 1:
        return merges[0]
    return SubsetMerge(*(torch.cat(indices) for indices in zip(
        *((merge.keep_idx, merge.src_idx, merge.dst_idx) for merge in merges))))


def relevance_of(selection: TokenSelection, encoder, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, video_embeds: torch.Tensor,
                 attended: Optional[torch.Tensor] = None,
                 first_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relevance of the video tokens `[K or 1, N, D]` by the selection's rule: `[K, N]` to
    the K texts (rule `text`), or `[K or 1, N]`, one row per video (rule `similarity`,
    blind to the texts); `attended` (the first layer's query states) and `first_keys` (its
    keys of the video) are reused where the caller has them."""
    with torch.no_grad():
        if selection.rule == "similarity":
            return similarity_relevance(video_embeds)
        cross = encoder.encoder.layer[0].crossattention.self
        if attended is None:
            attended = first_layer_queries(encoder, input_ids, attention_mask)
        if first_keys is None:
            first_keys = cross.key(video_embeds)
        return attention_relevance(cross, attended, first_keys, attention_mask,
                                   encoder.config.num_attention_heads)


def select_tokens(selection: TokenSelection, encoder, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, video_embeds: torch.Tensor
                  ) -> torch.Tensor:
    """The k tokens `[K, k, D]` each of the K texts cross-attends to, from the videos
    `[K or 1, N, D]` (one per text, or one for all): the straightforward path."""
    num_texts, num_tokens = input_ids.shape[0], video_embeds.shape[1]
    relevance = relevance_of(selection, encoder, input_ids, attention_mask, video_embeds)
    merge = choose_tokens(selection, video_embeds, relevance, num_texts)
    tokens = video_embeds.expand(num_texts, -1, -1)
    if merge is None:
        return tokens
    return merge.merge(tokens, tokens.new_ones(num_texts, num_tokens, 1))[0]


def merge_per_text(merge: Optional[SubsetMerge], projected: torch.Tensor, num_texts: int
                   ) -> torch.Tensor:
    """One video's projected keys or values `[1, N, W]` -> each text's merged ones
    `[K, k, W]` (all N when `merge` is None)."""
    if merge is None:
        return projected.expand(num_texts, -1, -1)  # [K, N, W], a view
    # texts in chunks: a text's merge gathers its N - k merged rows `[N - k, W]` first
    num_tokens, width = projected.shape[1:]
    merged = []
    for rows in chunks(num_texts, num_tokens * width * projected.element_size()):
        part = SubsetMerge(merge.keep_idx[rows], merge.src_idx[rows], merge.dst_idx[rows])
        count = len(part.keep_idx)
        merged.append(part.merge(projected.expand(count, -1, -1),
                                 projected.new_ones(count, num_tokens, 1))[0])
    return torch.cat(merged)  # [K, k, W]


def cross_attention_macs(num_words: int, num_tokens: int, width: int, vision_width: int,
                         layers: int, selection: Optional[TokenSelection],
                         texts_per_video: int = 1) -> Tuple[float, float]:
    """(MACs per pair of the cross-attention's products with the video, MACs per pair of
    its key and value projections of the video tokens) over `layers` layers, for texts of
    `num_words` words: QK^T and AV over the tokens attended (k or all), plus the rule
    `text`'s first-layer attention over all tokens; the projections of the full tokens
    (the merge runs after them) are shared by the `texts_per_video` texts of one video in
    re-ranking."""
    attended = num_tokens if selection is None else selection.k
    products = layers * 2 * num_words * width * attended
    if selection is not None and selection.rule == "text":
        products += num_words * width * num_tokens
    projections = layers * 2 * num_tokens * vision_width * width / texts_per_video
    return float(products), float(projections)
