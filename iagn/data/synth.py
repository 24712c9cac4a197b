"""A deterministic synthetic fine-grained dataset in CUB-200-2011's own file layout.

Why it is fine-grained and not trivial:
- every image shows the same kind of object (a bird-like body with head and tail) on a
  cluttered background; object colour, position, scale and facing are drawn from the same
  distributions for every class;
- the class is decided only by the *geometry* of a small patterned patch on the body
  (stripes at an angle, a rotated checkerboard, rings, rays, a spiral, blobs); each pattern
  covers about half of its patch with two colours drawn from the same distribution for
  every class, so global colour statistics carry almost no class information;
- the patch moves and scales from image to image; its box is written to `part_boxes.txt`,
  which gives the ground truth for judging attention maps (pointing game, box IoU).

Every image is drawn from its own random generator seeded by (seed, image index), so the
output is byte-identical for the same arguments and can be generated in parallel.
"""

from __future__ import annotations

import io
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from iagn.data.readers.cub import PART_BOXES_FILE
from iagn.errors import IagnError

FAMILIES = ("Stripes", "Checker", "Rings", "Rays", "Spiral", "Blobs")
JPEG_QUALITY = 92
# The pattern is rendered at this multiple of its final size, then downsampled: no aliasing.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class PatternClass:
    """One class: a pattern family and its family-specific parameter."""

    family: str
    param: float

    @property
    def name(self) -> str:
        if self.family in ("Stripes", "Checker", "Blobs"):
            return f"{self.family}_{round(math.degrees(self.param)):03d}deg"
        return f"{self.family}_{self.param:g}"


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 10
    images_per_class: int = 120
    size: int = 64
    seed: int = 0
    train_fraction: float = 0.5

    def check(self) -> None:
        if not 2 <= self.classes <= 999:
            raise IagnError(f"--classes must be between 2 and 999, got {self.classes}")
        if self.images_per_class < 2:
            raise IagnError(
                f"--images-per-class must be at least 2 (one train, one test), "
                f"got {self.images_per_class}"
            )
        if self.size < 32:
            raise IagnError(f"--size must be at least 32 pixels, got {self.size}")
        if not 0.0 < self.train_fraction < 1.0:
            raise IagnError(f"--train-fraction must be in (0, 1), got {self.train_fraction}")


def pattern_classes(count: int) -> list[PatternClass]:
    """Enumerate `count` distinct classes, cycling through families and spreading parameters."""
    per_family = math.ceil(count / len(FAMILIES))
    classes = []
    for index in range(count):
        family = FAMILIES[index % len(FAMILIES)]
        variant = index // len(FAMILIES)
        fraction = variant / per_family
        if family == "Stripes":
            param = math.radians(round(180 * fraction))
        elif family in ("Checker", "Blobs"):
            param = math.radians(round(90 * fraction))
        elif family == "Rings":
            param = round(2.0 + 3.0 * fraction, 2)  # rings across the radius
        elif family == "Rays":
            param = float(3 + 2 * variant)  # number of light/dark sector pairs
        else:  # Spiral: arms
            param = float(1 + variant)
        classes.append(PatternClass(family, param))
    return classes


def _pattern_mask(cls: PatternClass, pixels: int, phase: float) -> np.ndarray:
    """A boolean [pixels, pixels] mask: True where the first pattern colour goes."""
    coords = np.linspace(-1.0, 1.0, pixels, dtype=np.float64)
    v, u = np.meshgrid(coords, coords, indexing="ij")
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    cycles = 3.0  # pattern periods across the patch diameter: visible at small image sizes
    if cls.family == "Stripes":
        field = np.sin(math.pi * cycles * (u * math.cos(cls.param) + v * math.sin(cls.param)))
    elif cls.family == "Checker":
        a = u * math.cos(cls.param) + v * math.sin(cls.param)
        b = -u * math.sin(cls.param) + v * math.cos(cls.param)
        field = np.sin(math.pi * 2.0 * a) * np.sin(math.pi * 2.0 * b)
    elif cls.family == "Rings":
        field = np.sin(2 * math.pi * cls.param * r)
    elif cls.family == "Rays":
        field = np.sin(cls.param * theta)
    elif cls.family == "Spiral":
        field = np.sin(cls.param * theta + 2 * math.pi * 1.5 * r)
    else:  # Blobs: a rotated grid of round spots and holes
        a = u * math.cos(cls.param) + v * math.sin(cls.param)
        b = -u * math.sin(cls.param) + v * math.cos(cls.param)
        field = np.cos(math.pi * 2.0 * a) + np.cos(math.pi * 2.0 * b)
    # Random phase flips which colour lands where, so neither colour belongs to a class.
    return (field > 0) ^ (phase > 0.5)


def _random_color(rng: np.random.Generator, low: int = 30, high: int = 230) -> tuple:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _dark_and_light(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The pattern's two colours: a dark and a light shade with a random tint, from the same
    distribution for every class (so colour says nothing about the class), with enough
    contrast that the geometry is visible even at small image sizes."""
    tint = rng.integers(-25, 26, size=3)
    dark = np.clip(rng.integers(10, 60) + tint, 0, 255)
    light = np.clip(rng.integers(200, 250) + tint, 0, 255)
    return dark, light


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    for _ in range(int(rng.integers(12, 24))):
        kind = rng.integers(0, 3)
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.35) * w, y0 + rng.uniform(0.05, 0.35) * h
        color = _random_color(rng, 40, 215)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=max(1, int(rng.integers(1, 4))))


def render_image(
    cls: PatternClass, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple, tuple]:
    """Draw one image; return it with its object box and part box (x, y, w, h)."""
    height = size
    width = int(round(size * rng.uniform(1.0, 1.33)))
    image = Image.new("RGB", (width, height), _random_color(rng, 60, 200))
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(radius=size / 160))
    draw = ImageDraw.Draw(image)

    # Body: an ellipse; head on the facing side, tail on the other. Sizes relative to height.
    body_w = rng.uniform(0.42, 0.56) * height
    body_h = body_w * rng.uniform(0.55, 0.75)
    head_r = body_h * rng.uniform(0.22, 0.28)
    tail_len = body_w * rng.uniform(0.22, 0.32)
    facing = 1 if rng.random() < 0.5 else -1
    # Extents from the body centre towards the head (beak tip) and towards the tail tip.
    head_reach = body_w / 2 + 2.2 * head_r
    tail_reach = body_w * 0.42 + tail_len
    left_reach, right_reach = (tail_reach, head_reach) if facing == 1 else (head_reach, tail_reach)
    cx = rng.uniform(left_reach + 1, width - right_reach - 1)
    cy = rng.uniform(body_h / 2 + head_r + 1, height - body_h / 2 - 1)
    body_color = _random_color(rng)

    tail_base = cx - facing * body_w * 0.42
    tail_tip = tail_base - facing * tail_len
    tail = [
        (tail_base, cy - body_h * 0.15),
        (tail_tip, cy - body_h * 0.35),
        (tail_tip, cy + body_h * 0.25),
        (tail_base, cy + body_h * 0.15),
    ]
    draw.polygon(tail, fill=tuple(int(c * 0.8) for c in body_color))
    draw.ellipse((cx - body_w / 2, cy - body_h / 2, cx + body_w / 2, cy + body_h / 2), fill=body_color)
    head_cx = cx + facing * (body_w / 2 + head_r * 0.4)
    head_cy = cy - body_h / 2 + head_r * 0.2
    draw.ellipse((head_cx - head_r, head_cy - head_r, head_cx + head_r, head_cy + head_r), fill=body_color)
    beak_base = head_cx + facing * head_r * 0.9
    beak = [
        (beak_base, head_cy - head_r * 0.2),
        (beak_base + facing * head_r * 0.8, head_cy),
        (beak_base, head_cy + head_r * 0.25),
    ]
    draw.polygon(beak, fill=_random_color(rng, 150, 250))
    eye_r = max(1.0, head_r * 0.15)
    eye_x = head_cx + facing * head_r * 0.35
    draw.ellipse((eye_x - eye_r, head_cy - eye_r, eye_x + eye_r, head_cy + eye_r), fill=(10, 10, 10))

    xs = [cx - body_w / 2, cx + body_w / 2, head_cx - head_r, head_cx + head_r, tail_tip]
    xs += [beak_base + facing * head_r * 0.8]
    ys = [cy - body_h / 2, cy + body_h / 2, head_cy - head_r, cy + body_h * 0.25]
    x0, x1 = max(0.0, min(xs)), min(float(width), max(xs))
    y0, y1 = max(0.0, min(ys)), min(float(height), max(ys))
    object_box = (x0, y0, x1 - x0, y1 - y0)

    # The discriminative part: a round patterned patch somewhere on the body.
    diameter = body_h * rng.uniform(0.62, 0.85)
    reach_x = body_w / 2 - diameter / 2
    reach_y = body_h / 2 - diameter / 2
    # Stay inside the ellipse: sample a point in the inner ellipse of radii reach_x, reach_y.
    angle = rng.uniform(0, 2 * math.pi)
    radius = math.sqrt(rng.uniform(0, 1)) * 0.8
    px = cx + radius * reach_x * math.cos(angle)
    py = cy + radius * max(reach_y, 0.0) * math.sin(angle)
    pixels = max(4, int(round(diameter)))
    left, top = int(round(px - pixels / 2)), int(round(py - pixels / 2))
    mask = _pattern_mask(cls, pixels * SUPERSAMPLE, rng.random())
    color_a, color_b = _dark_and_light(rng)
    patch = np.where(mask[..., None], color_a, color_b).astype(np.uint8)
    patch_image = Image.fromarray(patch).resize((pixels, pixels), Image.Resampling.BOX)
    disc = Image.new("L", (pixels * SUPERSAMPLE,) * 2, 0)
    ImageDraw.Draw(disc).ellipse((0, 0, pixels * SUPERSAMPLE - 1, pixels * SUPERSAMPLE - 1), fill=255)
    disc = disc.resize((pixels, pixels), Image.Resampling.BOX)
    image.paste(patch_image, (left, top), disc)
    part_box = (float(left), float(top), float(pixels), float(pixels))

    # Sensor-like noise so flat regions are not trivially separable from the patch.
    array = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0.0, 6.0, size=array.shape).round().astype(np.int16)
    image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
    return image, object_box, part_box


def _render_job(args: tuple) -> tuple[bytes, tuple, tuple]:
    cls, size, seed, index = args
    rng = np.random.default_rng([seed, index])
    image, object_box, part_box = render_image(cls, size, rng)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), object_box, part_box


def _box_text(image_id: int, box: tuple) -> str:
    return f"{image_id} " + " ".join(f"{v:.1f}" for v in box)


def generate(out: str | Path, config: SynthConfig, workers: int = 1, progress=None) -> Path:
    """Write the dataset to `out` (replaced if it exists) and return the path.

    The dataset is built in a temporary sibling folder and moved into place at the end,
    so an interrupted run never leaves a half-written dataset behind.
    """
    config.check()
    out = Path(out)
    classes = pattern_classes(config.classes)
    folder_names = [f"{i + 1:03d}.{cls.name}" for i, cls in enumerate(classes)]
    jobs, entries = [], []
    n_train = max(1, min(config.images_per_class - 1, round(config.images_per_class * config.train_fraction)))
    for class_index, cls in enumerate(classes):
        for k in range(config.images_per_class):
            image_id = len(entries) + 1
            rel = f"{folder_names[class_index]}/{cls.name}_{k + 1:04d}_{image_id}.jpg"
            entries.append((image_id, rel, class_index + 1, 1 if k < n_train else 0))
            jobs.append((cls, config.size, config.seed, image_id))

    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    for name in folder_names:
        (staging / "images" / name).mkdir(parents=True, exist_ok=True)

    results = []
    executor = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        mapped = executor.map(_render_job, jobs, chunksize=16) if executor else map(_render_job, jobs)
        for entry, result in zip(entries, mapped, strict=True):
            (staging / "images" / entry[1]).write_bytes(result[0])
            results.append(result)
            if progress is not None:
                progress(1)
    finally:
        if executor:
            executor.shutdown()

    lines = {
        "images.txt": [f"{i} {rel}" for i, rel, _, _ in entries],
        "classes.txt": [f"{i + 1} {name}" for i, name in enumerate(folder_names)],
        "image_class_labels.txt": [f"{i} {label}" for i, _, label, _ in entries],
        "train_test_split.txt": [f"{i} {train}" for i, _, _, train in entries],
        "bounding_boxes.txt": [_box_text(e[0], r[1]) for e, r in zip(entries, results, strict=True)],
        PART_BOXES_FILE: [_box_text(e[0], r[2]) for e, r in zip(entries, results, strict=True)],
    }
    for name, rows in lines.items():
        (staging / name).write_text("\n".join(rows) + "\n")

    if out.exists():
        backup = out.parent / f".{out.name}.old"
        if backup.exists():
            shutil.rmtree(backup)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    return out



