"""Attention: boxes from activation maps, attention-guided crops and attention drop.

Box from a map: the map (values in [0, 1]) is upsampled to the image and thresholded at
`threshold` (0.5: the region at least half as active as the peak, as in WS-DAN's crop
threshold). Method "threshold": the box bounds every pixel above it; "component": only the
region connected to the peak, so a second active spot elsewhere does not stretch the box;
"centroid": a box of `box_size` x the image's sides centred on the map-weighted centre of
that region. A coarse map (8 x 8 at tap 1 for a 64 px image) places a part better than it
outlines it, so its extent overstates small parts. A map that is flat everywhere gives the
whole image. Serving picks the method, threshold and size on the validation split
(iagn/evaluation/choose.py).

Attention crop: the box, enlarged by a margin (random in [margin_low, margin_high] of the
box size at train time, fixed at test time), is cut out and resized back to the input size
with `roi_align`: one batched op, differentiable with respect to the image.

Attention drop: pixels where the map exceeds `drop_threshold` are erased (set to 0, the
normalized mean colour), so the network must find a second discriminative region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def upsample_map(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear."""
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


BOX_METHODS = ("threshold", "component", "centroid")


def boxes_from_maps(
    cam: torch.Tensor,
    size: tuple[int, int],
    threshold: float = 0.5,
    method: str = "threshold",
    box_size: float = 0.25,
) -> torch.Tensor:
    """Boxes [B, 4] (x0, y0, x1, y1 in pixels of an image of `size` = (H, W))."""
    if method not in BOX_METHODS:
        raise ValueError(f"unknown box method {method!r}; one of {BOX_METHODS}")
    height, width = size
    upsampled = upsample_map(cam, size)
    mask = upsampled >= threshold
    if method != "threshold":
        mask = peak_component(upsampled, mask)
    if method == "centroid":
        weights = (upsampled - threshold).clamp_min(0) * mask
        return centred_boxes(weights, size, box_size)
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # [B, H], [B, W]
    empty = ~rows.any(dim=1)
    ys = torch.arange(height, device=cam.device).expand_as(rows)
    xs = torch.arange(width, device=cam.device).expand_as(cols)
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    full = torch.tensor([0.0, 0.0, width, height], device=cam.device)
    return torch.where(empty.unsqueeze(1), full, boxes)


def peak_component(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 8-connected region of `mask` [B, H, W] that holds each map's peak."""
    flat = values.flatten(1)
    region = torch.zeros_like(flat, dtype=torch.bool)
    region.scatter_(1, flat.argmax(dim=1, keepdim=True), True)
    region = region.view_as(mask) & mask
    # Grow by one pixel per round inside the mask until nothing changes (at most H x W
    # rounds; a compact blob takes about its radius).
    while True:
        grown = F.max_pool2d(region.unsqueeze(1).float(), 3, stride=1, padding=1)[:, 0] > 0
        grown &= mask
        if torch.equal(grown, region):
            return region
        region = grown


def centred_boxes(weights: torch.Tensor, size: tuple[int, int], box_size: float) -> torch.Tensor:
    """Boxes of `box_size` x (W, H) centred on the weighted centre of `weights` [B, H, W]
    (the image centre where all weights are 0), shifted inside the image."""
    height, width = size
    total = weights.sum(dim=(1, 2))
    ys = torch.arange(height, device=weights.device, dtype=weights.dtype) + 0.5
    xs = torch.arange(width, device=weights.device, dtype=weights.dtype) + 0.5
    safe = total.clamp_min(1e-12)
    cx = torch.where(total > 0, (weights.sum(dim=1) * xs).sum(dim=1) / safe, width / 2)
    cy = torch.where(total > 0, (weights.sum(dim=2) * ys).sum(dim=1) / safe, height / 2)
    half_w, half_h = box_size * width / 2, box_size * height / 2
    x0 = (cx - half_w).clamp(0, width - 2 * half_w)
    y0 = (cy - half_h).clamp(0, height - 2 * half_h)
    return torch.stack([x0, y0, x0 + 2 * half_w, y0 + 2 * half_h], dim=1).float()


def peak_points(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (x, y) pixel of each map's maximum, in an image of `size` = (H, W): [B, 2]."""
    upsampled = upsample_map(cam, size)
    flat = upsampled.flatten(1).argmax(dim=1)
    width = size[1]
    return torch.stack([flat % width, flat // width], dim=1).float() + 0.5


def expand_boxes(
    boxes: torch.Tensor,
    size: tuple[int, int],
    margin: float | tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Grow boxes by `margin` x their size on each side (random in a range), clipped."""
    if isinstance(margin, tuple):
        low, high = margin
        noise = torch.rand(boxes.shape[0], 1, generator=generator).to(boxes.device)
        margin_t = low + (high - low) * noise
    else:
        margin_t = torch.full((boxes.shape[0], 1), float(margin), device=boxes.device)
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0)
    grown = torch.cat([boxes[:, :2] - margin_t * wh, boxes[:, 2:] + margin_t * wh], dim=1)
    height, width = size
    limits = torch.tensor([width, height, width, height], device=boxes.device, dtype=grown.dtype)
    return torch.minimum(grown.clamp_min(0.0), limits)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cut `boxes` [B, 4] out of `images` [B, C, H, W] and resize each to H x W."""
    height, width = images.shape[-2:]
    index = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(images.dtype)], dim=1)
    crops = roi_align(
        images.float(),
        rois.float(),
        output_size=(height, width),
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )
    return crops.to(images.dtype)


def attention_drop(
    images: torch.Tensor, cam: torch.Tensor, drop_threshold: float = 0.5
) -> torch.Tensor:
    """Erase (zero) the pixels where the upsampled map is above `drop_threshold`."""
    mask = upsample_map(cam, images.shape[-2:]) < drop_threshold
    return images * mask.unsqueeze(1).to(images.dtype)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two [B, 4] XYXY box tensors: [B]."""
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp_min(1e-8)
