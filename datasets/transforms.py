"""Clip transforms: CLIP normalisation, random crops and temporally consistent RandAugment.

Every transform takes uint8 clips `[T, 3, H, W]` (an image is a clip with T = 1) and draws its
randomness from a `random.Random`, once per clip, so every frame gets the same crop and ops.
"""
import math
import random

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's RandomAugment: levels are out of 10, every drawn op is applied with probability 0.5
MAX_LEVEL = 10
APPLY_PROB = 0.5
FILL = [128.0, 128.0, 128.0]
VIDEO_OPS = ("Identity", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
             "TranslateX", "TranslateY", "Rotate", "HorizontalFlip")
IMAGE_OPS = ("Identity", "Brightness", "Sharpness", "ShearX", "ShearY",
             "TranslateX", "TranslateY", "Rotate")
# fine-tuning option: no flip, since captions may say "left" and "right"
FINETUNE_OPS = VIDEO_OPS[:-1]


def normalize(clip: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 3, H, W]` -> float32 `[..., 3, H, W]`: (clip / 255 - CLIP_MEAN) / CLIP_STD."""
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    scale = 1.0 / (255.0 * std)
    shift = torch.tensor(CLIP_MEAN).view(3, 1, 1) / std
    return clip.float().mul_(scale).sub_(shift)


def random_square_crop(clip: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """Crop the same `size` x `size` window from every frame of `[T, 3, H, W]`."""
    height, width = clip.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {height}x{width}")
    top = rng.randint(0, height - size)
    left = rng.randint(0, width - size)
    return clip[..., top:top + size, left:left + size]


def random_resized_crop(clip: torch.Tensor, size: int, scale: tuple[float, float],
                        rng: random.Random) -> torch.Tensor:
    """Inception-style crop (area in `scale`, aspect ratio in [3/4, 4/3]) resized bicubically."""
    height, width = clip.shape[-2:]
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            break
    else:
        crop_h, crop_w = min(height, width), min(height, width)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return F.resized_crop(clip, top, left, crop_h, crop_w, [size, size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)


def random_horizontal_flip(clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return F.horizontal_flip(clip) if rng.random() < 0.5 else clip


def _enhance_factor(level: float) -> float:
    return level * 1.8 + 0.1


def _affine(clip: torch.Tensor, angle=0.0, translate=(0.0, 0.0), shear=(0.0, 0.0)) -> torch.Tensor:
    return F.affine(clip, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=InterpolationMode.BILINEAR, fill=FILL)


def _shear_degrees(level: float, sign: float) -> float:
    return math.degrees(math.atan(sign * level * 0.3))


# op name -> f(clip, level in [0, 1], sign in {-1, 1}); magnitudes as in BLIP's RandomAugment
AUGMENTATIONS = {
    "Identity": lambda clip, level, sign: clip,
    "Contrast": lambda clip, level, sign: F.adjust_contrast(clip, _enhance_factor(level)),
    "Brightness": lambda clip, level, sign: F.adjust_brightness(clip, _enhance_factor(level)),
    "Sharpness": lambda clip, level, sign: F.adjust_sharpness(clip, _enhance_factor(level)),
    "ShearX": lambda clip, level, sign: _affine(clip, shear=(_shear_degrees(level, sign), 0.0)),
    "ShearY": lambda clip, level, sign: _affine(clip, shear=(0.0, _shear_degrees(level, sign))),
    "TranslateX": lambda clip, level, sign: _affine(clip, translate=(sign * level * 10, 0.0)),
    "TranslateY": lambda clip, level, sign: _affine(clip, translate=(0.0, sign * level * 10)),
    "Rotate": lambda clip, level, sign: _affine(clip, angle=sign * level * 30),
    "HorizontalFlip": lambda clip, level, sign: F.horizontal_flip(clip),
}


class TemporalRandAugment:
    """RandAugment (N ops of magnitude M out of 10) drawn once and applied to every frame."""

    def __init__(self, num_ops: int, magnitude: int, ops: tuple[str, ...] = VIDEO_OPS):
        unknown = sorted(set(ops) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}")
        self.num_ops = num_ops
        self.level = magnitude / MAX_LEVEL
        self.ops = ops

    def __call__(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        for name in rng.choices(self.ops, k=self.num_ops):
            if rng.random() > APPLY_PROB:
                continue
            sign = -1.0 if rng.random() < 0.5 else 1.0
            clip = AUGMENTATIONS[name](clip, self.level, sign)
        return clip


class PretrainVideoTransform:
    """Pre-training clips decoded at `video_resize`: random square crop + RandAugment(2, 5)
    (`augment=False`: the crop only)."""

    def __init__(self, image_size: int, *, augment: bool = True):
        self.image_size = image_size
        self.augment = TemporalRandAugment(num_ops=2, magnitude=5, ops=VIDEO_OPS) if augment else None

    def __call__(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        clip = random_square_crop(clip, self.image_size, rng)
        return normalize(clip if self.augment is None else self.augment(clip, rng))


class PretrainImageTransform:
    """Pre-training images `[3, H, W]`: random resized crop, flip, RandAugment(2, 7), then a
    static clip `[num_frames, 3, image_size, image_size]`."""

    def __init__(self, image_size: int, num_frames: int):
        self.image_size = image_size
        self.num_frames = num_frames
        self.augment = TemporalRandAugment(num_ops=2, magnitude=7, ops=IMAGE_OPS)

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        image = random_resized_crop(image, self.image_size, (0.5, 1.0), rng)
        image = random_horizontal_flip(image, rng)
        image = normalize(self.augment(image, rng))
        return image.expand(self.num_frames, -1, -1, -1).contiguous()  # [3, H, W] -> [T, 3, H, W]


class FinetuneTransform:
    """Fine-tuning clips (already `image_size` on decode): optional RandAugment(2, 5) without flips."""

    def __init__(self, augment: bool):
        self.augment = TemporalRandAugment(num_ops=2, magnitude=5, ops=FINETUNE_OPS) if augment else None

    def __call__(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.augment is not None:
            clip = self.augment(clip, rng)
        return normalize(clip)
