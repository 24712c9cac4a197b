"""Torch datasets on a manifest, with boxes that follow every transform.

Images go through torchvision transforms v2 together with their boxes (object box and
discriminative-part box, as `tv_tensors.BoundingBoxes`), so resizes, crops and flips move
the boxes with the pixels and ground truth stays aligned with the tensors.

Splits: the manifest's own "val" rows are used when the dataset has them (FGVC-Aircraft,
ImageFolder with val/). Otherwise `carve_validation` moves a stratified, seeded fraction of
"train" rows to "val". The "test" split is never used for model selection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from iagn.data.images import DEFAULT_MAX_PIXELS, open_image
from iagn.data.manifest import BOX_COLUMNS, PART_BOX_COLUMNS
from iagn.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def carve_validation(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Return a copy where a stratified `fraction` of each class's train rows is "val".

    Datasets that already have a val split are returned unchanged. Each class with at
    least two training images keeps at least one for training and gives at least one to
    validation; the choice depends only on `seed` and the image ids.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    result = manifest.copy()
    if (result["split"] == "val").any() or fraction == 0.0:
        return result
    rng = np.random.default_rng(seed)
    train = result[result["split"] == "train"]
    val_index = []
    for _, group in train.sort_values("image_id").groupby("label", sort=True):
        count = len(group)
        if count < 2:
            continue
        take = min(count - 1, max(1, round(count * fraction)))
        chosen = rng.permutation(count)[:take]
        val_index.extend(group.index[chosen])
    result.loc[val_index, "split"] = "val"
    return result


def build_transform(
    train: bool,
    resize: int,
    crop: int,
    hflip: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """The standard fine-grained recipe: resize the shorter side, then crop.

    Train: random crop and horizontal flip; eval: center crop. Boxes are clamped to the
    crop (a box cut off entirely keeps zero area and is reported invalid by the dataset).
    """
    if crop > resize:
        raise DataError(f"crop size {crop} is larger than resize {resize}; use crop <= resize")
    steps: list = [v2.ToImage(), v2.Resize(resize, antialias=True)]
    if train:
        steps.append(v2.RandomCrop(crop))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.CenterCrop(crop))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)


class FineGrainedDataset(Dataset):
    """One split of a manifest as tensors, decoded by `iagn.data.images.open_image` (pixel
    limit `max_pixels`, 16-bit/float refused, alpha on white).

    Each item is a dict:
        image     float tensor [3, H, W] (normalized)
        label     int64 scalar
        boxes     float tensor [2, 4] in XYXY pixels of the transformed image:
                  row 0 the object box, row 1 the discriminative-part box
        box_valid bool tensor [2]: False where the dataset has no such box or the crop cut it
        image_id  int64 scalar
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        root: str | Path,
        split: str | None,
        transform=None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        rows = manifest if split is None else manifest[manifest["split"] == split]
        if rows.empty:
            raise DataError(
                f"the dataset has no images in split {split!r}",
                hint="check the dataset's split files or the validation fraction",
            )
        self.root = Path(root)
        self.transform = transform
        self.max_pixels = max_pixels
        self.paths = [self.root / p for p in rows["path"]]
        self.labels = torch.tensor(rows["label"].to_numpy(), dtype=torch.int64)
        self.image_ids = torch.tensor(rows["image_id"].to_numpy(), dtype=torch.int64)
        self.object_boxes = rows[list(BOX_COLUMNS)].to_numpy(dtype=np.float32)
        self.part_boxes = rows[list(PART_BOX_COLUMNS)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = open_image(self.paths[index], self.max_pixels)
        width, height = image.size
        xywh = np.stack([self.object_boxes[index], self.part_boxes[index]])
        known = ~np.isnan(xywh).any(axis=1)
        # Unknown boxes ride along as the whole image so shapes stay fixed; `known` masks them.
        xywh[~known] = (0.0, 0.0, width, height)
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(xywh), format="XYWH", canvas_size=(height, width)
        )
        boxes = v2.ConvertBoundingBoxFormat("XYXY")(boxes)
        if self.transform is not None:
            image, boxes = self.transform(image, boxes)
        else:
            image = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return {
            "image": torch.as_tensor(image),
            "label": self.labels[index],
            "boxes": torch.as_tensor(boxes, dtype=torch.float32),
            "box_valid": torch.from_numpy(known) & (area > 0),
            "image_id": self.image_ids[index],
        }
