"""Drawing which frames and patches TESTA merged (the paper's Figure 3), as ToMe ships
tome/vis.py and TESTA testa/vis.py inside their packages (re-written here).

Every original (frame, patch) is coloured by the token it ended in: patches of one
colour, outlined in white, were merged into one token; a coloured rectangle encloses
frames merged into one frame token. `visualize_video(encoder, path, out_png)` decodes,
runs and draws; `draw_aggregation(frames, state, label, out_png)` draws a `TokenState`
from `encoder.forward_with_state(video, track_source=True)`.
"""
import math
import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from einops import rearrange
from matplotlib import image
from matplotlib.collections import LineCollection
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from datasets.base import video_batch
from datasets.video import read_test_frames
from models.token_state import TokenState
from models.video_encoder import VideoEncoder

GOLDEN_RATIO = (math.sqrt(5) - 1) / 2
FRAME_GROUP_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")
PATCH_ALPHA = 0.45
PANEL_IN, GAP_IN, MARGIN_IN, TITLE_IN, LABEL_IN = 1.7, 0.3, 0.2, 0.7, 0.3
RECT_PAD_IN = 0.08
TITLE_PAD_PT = 9  # frame labels sit above the frame-group rectangles
CHARS_PER_IN = 13  # of the 10-pt title, for wrapping
LEGEND = ("rectangle: frames merged into one frame token F; one colour (white outline): "
          "patches merged into one token; untinted: a patch alone in its token")


# source -> groups ---------------------------------------------------------------------
def first_appearance_ids(labels: torch.Tensor) -> torch.Tensor:
    """Relabel integer `labels` as 0, 1, ... in order of first appearance (row-major)."""
    flat = labels.flatten()
    unique, inverse = torch.unique(flat, return_inverse=True)
    positions = torch.arange(flat.numel())
    first = torch.full((len(unique),), flat.numel()).scatter_reduce(
        0, inverse, positions, reduce="amin")
    rank = first.argsort().argsort()
    return rank[inverse].view_as(labels)


def _owner(source: torch.Tensor, what: str) -> torch.Tensor:
    """Row holding the single 1 of every column of a 0/1 map `[tokens, originals]`."""
    if not torch.all(source.sum(dim=0) == 1):
        raise ValueError(f"the {what} source does not map every original {what} to exactly one token")
    return source.argmax(dim=0)


def original_frames(state: TokenState) -> int:
    """T0: frames of the input video (joint attention never merges frames)."""
    return state.frame_source.shape[-1] if state.frame_source is not None else state.num_frames


def patch_groups(state: TokenState, index: int = 0) -> torch.Tensor:
    """Token every original patch ended in: `[T0, L0]` ids 0..K-1 (K tokens, first-seen order)."""
    if state.source is None:
        raise ValueError("the state has no source; run forward_with_state(..., track_source=True)")
    source = state.source[index]  # [T', 1+L', T0*L0] (divided) or [1+N, T0*L0] (joint)
    owner = _owner(source.reshape(-1, source.shape[-1]), "patch")  # [T0*L0]
    return first_appearance_ids(rearrange(owner, "(t l) -> t l", t=original_frames(state)))


def frame_groups(state: TokenState, index: int = 0) -> torch.Tensor:
    """Frame token every original frame ended in: `[T0]` ids 0..F-1 (first-seen order)."""
    if state.frame_source is None:
        return torch.arange(original_frames(state))
    return first_appearance_ids(_owner(state.frame_source[index], "frame"))


def group_colours(num_groups: int) -> np.ndarray:
    """`[num_groups, 3]` distinct RGB colours; consecutive ids get far-apart hues."""
    ids = np.arange(num_groups)
    hue = (ids * GOLDEN_RATIO) % 1.0
    saturation = np.where(ids % 2, 0.55, 0.95)
    value = np.where((ids // 2) % 2, 0.75, 1.0)
    return hsv_to_rgb(np.stack([hue, saturation, value], axis=-1))


def spatial_group_sizes(groups: np.ndarray) -> np.ndarray:
    """`[T0, L0]` ids -> how many patches of its own frame share each patch's id."""
    sizes = np.zeros_like(groups)
    for t, row in enumerate(groups):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        sizes[t] = counts[inverse]
    return sizes


def patch_overlay(groups: np.ndarray) -> np.ndarray:
    """`[T0, gh, gw]` ids -> `[T0, gh, gw, 4]` RGBA: one colour per group, transparent
    where a patch shares its token with no other patch of its frame."""
    colours = group_colours(int(groups.max()) + 1)[groups]  # [T0, gh, gw, 3]
    merged = spatial_group_sizes(rearrange(groups, "t gh gw -> t (gh gw)")) > 1
    alpha = np.where(merged, PATCH_ALPHA, 0.0).reshape(groups.shape)[..., None]
    return np.concatenate([colours, alpha], axis=-1)


# drawing ------------------------------------------------------------------------------
def patch_grid(frame_shape: Tuple[int, int], num_patches: int) -> Tuple[int, int, int]:
    """(patch size, grid height, grid width) of frames `[H, W]` cut into `num_patches` squares."""
    height, width = frame_shape
    patch = math.isqrt(height * width // num_patches)
    if patch == 0 or height % patch or width % patch or (height // patch) * (width // patch) != num_patches:
        raise ValueError(f"frames of {height}x{width} px do not split into {num_patches} square patches")
    return patch, height // patch, width // patch


def group_boundaries(groups: np.ndarray, merged: np.ndarray, patch: int
                     ) -> List[List[Tuple[float, float]]]:
    """Pixel segments between neighbouring patches of different groups in one `[gh, gw]`
    grid, where at least one side is `merged` (shares its token with other patches)."""
    vertical = (groups[:, 1:] != groups[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    horizontal = (groups[1:, :] != groups[:-1, :]) & (merged[1:, :] | merged[:-1, :])
    segments = []
    for i, j in zip(*np.nonzero(vertical)):
        x = (j + 1) * patch - 0.5
        segments.append([(x, i * patch - 0.5), (x, (i + 1) * patch - 0.5)])
    for i, j in zip(*np.nonzero(horizontal)):
        y = (i + 1) * patch - 0.5
        segments.append([(j * patch - 0.5, y), ((j + 1) * patch - 0.5, y)])
    return segments


def frame_runs(groups: List[int], columns: int) -> List[Tuple[int, int, int]]:
    """(first, last, group) of each run of consecutive frames of one group on one row."""
    runs = []
    for t, group in enumerate(groups):
        if runs and runs[-1][2] == group and t % columns != 0:
            runs[-1] = (runs[-1][0], t, group)
        else:
            runs.append((t, t, group))
    return runs


class PanelLayout:
    """Positions (figure fractions) of `count` square panels in rows of `columns`."""

    def __init__(self, count: int, columns: int):
        self.columns = min(columns, count)
        self.rows = math.ceil(count / self.columns)
        self.width = 2 * MARGIN_IN + self.columns * PANEL_IN + (self.columns - 1) * GAP_IN
        self.height = TITLE_IN + self.rows * (PANEL_IN + LABEL_IN) + (self.rows - 1) * GAP_IN + MARGIN_IN

    def panel(self, index: int, pad: float = 0.0) -> Tuple[float, float, float, float]:
        """(left, bottom, width, height) of panel `index`, grown by `pad` inches each side."""
        row, column = divmod(index, self.columns)
        left = MARGIN_IN + column * (PANEL_IN + GAP_IN) - pad
        top = TITLE_IN + LABEL_IN + row * (PANEL_IN + LABEL_IN + GAP_IN) - pad
        size = PANEL_IN + 2 * pad
        return (left / self.width, 1 - (top + size) / self.height,
                size / self.width, size / self.height)

    def span(self, first: int, last: int) -> Tuple[float, float, float, float]:
        """(left, bottom, width, height) enclosing panels `first..last` of one row."""
        left, bottom, _, height = self.panel(first, RECT_PAD_IN)
        right_left, _, right_width, _ = self.panel(last, RECT_PAD_IN)
        return left, bottom, right_left + right_width - left, height


def draw_aggregation(frames: np.ndarray, state: TokenState, block_label: str, out_png,
                     columns: int = 8, index: int = 0) -> Path:
    """Draw video `index` of `state` over its frames and save a PNG.

    frames: uint8 `[T0, H, W, 3]`, the frames the encoder saw; state: a `TokenState`
    with `source` (and `frame_source` for divided attention) from
    `forward_with_state(..., track_source=True)`; block_label: names the block in the title.
    """
    frames = np.asarray(frames)
    patches = patch_groups(state, index)  # [T0, L0]
    frames_of = frame_groups(state, index).tolist()  # [T0]
    if frames.shape[0] != patches.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames given but the state tracks {patches.shape[0]}")
    patch, grid_h, _ = patch_grid(frames.shape[1:3], patches.shape[1])
    grids = rearrange(patches.numpy(), "t (gh gw) -> t gh gw", gh=grid_h)
    overlay = patch_overlay(grids)  # [T0, gh, gw, 4]
    merged = overlay[..., 3] > 0  # [T0, gh, gw]
    overlay = overlay.repeat(patch, axis=1).repeat(patch, axis=2)  # [T0, H, W, 4]
    merged_frames = [g for g in dict.fromkeys(frames_of) if frames_of.count(g) > 1]

    layout = PanelLayout(len(frames), columns)
    figure = Figure(figsize=(layout.width, layout.height))
    for t, frame in enumerate(frames):
        ax = figure.add_axes(layout.panel(t))
        ax.imshow(frame)
        ax.imshow(overlay[t])
        ax.add_collection(LineCollection(group_boundaries(grids[t], merged[t], patch),
                                         colors="white", linewidths=0.6))
        ax.set_title(f"frame {t} \u2192 F{frames_of[t]}", fontsize=8, pad=TITLE_PAD_PT)
        ax.set_axis_off()
    for first, last, group in frame_runs(frames_of, layout.columns):
        if group in merged_frames:
            left, bottom, width, height = layout.span(first, last)
            colour = FRAME_GROUP_COLOURS[merged_frames.index(group) % len(FRAME_GROUP_COLOURS)]
            figure.add_artist(Rectangle((left, bottom), width, height, transform=figure.transFigure,
                                        fill=False, edgecolor=colour, linewidth=2.5))
    summary = (f"{block_label}: {len(frames)} frames x {patches.shape[1]} patches -> "
               f"{max(frames_of) + 1} frame tokens, {int(patches.max()) + 1} tokens")
    figure.suptitle(summary + "\n" + textwrap.fill(LEGEND, width=int(layout.width * CHARS_PER_IN)),
                    fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    return out_png


# running the encoder ------------------------------------------------------------------
def aggregation_state(encoder: VideoEncoder, frames: torch.Tensor,
                      num_blocks: Optional[int] = None) -> TokenState:
    """Run `encoder` on uint8 frames `[T, 3, H, W]` with source tracking; its `TokenState`."""
    weight = encoder.cls_token
    video = video_batch([frames]).to(weight.device, weight.dtype)  # [1, 3, T, H, W]
    with torch.no_grad():
        _, state = encoder.forward_with_state(video, track_source=True, num_blocks=num_blocks)
    return state


def visualize_video(encoder: VideoEncoder, video_path: str, out_png, num_frames: Optional[int] = None,
                    num_blocks: Optional[int] = None, columns: int = 8) -> Path:
    """Decode `num_frames` uniform frames (default: the encoder's), run up to block
    `num_blocks` (default: all) and draw the aggregation to `out_png`."""
    size = encoder.patch_embed.img_size[0]
    frames = read_test_frames(video_path, num_frames or encoder.num_frames, size)  # [T, 3, H, W]
    state = aggregation_state(encoder, frames, num_blocks)
    blocks = num_blocks or encoder.depth
    label = f"{Path(video_path).name}, after block {blocks}/{encoder.depth}"
    return draw_aggregation(rearrange(frames, "t c h w -> t h w c").numpy(), state, label,
                            out_png, columns)


def side_by_side(left_png, right_png, out_png) -> Path:
    """Join two PNGs left to right (the shorter one padded white at the bottom)."""
    left, right = image.imread(str(left_png)), image.imread(str(right_png))
    height = max(left.shape[0], right.shape[0])
    padded = [np.concatenate([image, np.ones((height - image.shape[0], *image.shape[1:]),
                                             dtype=image.dtype)]) for image in (left, right)]
    image.imsave(str(out_png), np.concatenate(padded, axis=1))
    return Path(out_png)
