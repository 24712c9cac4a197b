"""ImageFolder reader: one folder per split, one folder per class inside it.

Layout:
    train/<class name>/<image files>    required
    val/<class name>/<image files>      optional
    test/<class name>/<image files>     optional, but val/ or test/ must exist

Training needs held-out images, so a dataset with train/ alone is rejected; most users have
train/ and test/. Classes are the class folders of train/, sorted by name (the order
torchvision's ImageFolder uses), and the labels follow that order. A class folder in val/
or test/ must also exist in train/: a class without training images cannot be learned.

Images are the files ending in .jpg, .jpeg, .png, .bmp or .webp (any case); hidden files and
folders are ignored, other files (notes, thumbnails databases) too. Images must sit directly
in their class folder. There are no boxes. Image ids are 1..N in split order (train, val,
test), then class name, then file name.
"""

from __future__ import annotations

import os
from pathlib import Path

from iagn.data.manifest import ImageRecord, RawDataset, check_inside_root
from iagn.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
HINT = "lay the dataset out as train/<class>/<image>, test/<class>/<image> (val/ optional)"


def _visible(folder: Path) -> list[os.DirEntry]:
    return sorted(
        (entry for entry in os.scandir(folder) if not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def looks_like(root: Path) -> bool:
    train = Path(root) / "train"
    try:
        return train.is_dir() and any(entry.is_dir() for entry in _visible(train))
    except OSError:
        return False


def _read_split(split_dir: Path) -> dict[str, list[str]]:
    """Class name -> sorted image file names, for one split folder."""
    classes: dict[str, list[str]] = {}
    for entry in _visible(split_dir):
        if not entry.is_dir():
            if _is_image(entry.name):
                raise DataError(
                    "image lies directly in the split folder, outside any class folder",
                    path=Path(entry.path),
                    hint=f"move it into {split_dir}/<class name>/",
                )
            continue
        files = []
        for item in _visible(Path(entry.path)):
            if item.is_dir():
                # Silently skipping it would drop its images from the dataset unnoticed.
                raise DataError(
                    "a class folder contains a subfolder; images must sit directly in it",
                    path=Path(item.path),
                    hint=f"move the images up into {entry.path} or remove the subfolder",
                )
            if _is_image(item.name):
                files.append(item.name)
        classes[entry.name] = files
    return classes


def read(root: Path, allow_outside_root: bool = False) -> RawDataset:
    """The dataset at `root`; images (and the folders holding them) must not be links that
    lead out of it unless `allow_outside_root`."""
    root = Path(root)
    splits = {split: root / split for split in SPLITS if (root / split).is_dir()}
    if "train" not in splits:
        raise DataError("no train/ folder", path=root, hint=HINT)
    if len(splits) == 1:
        raise DataError(
            "only train/ exists: there are no held-out images to validate or test on",
            path=root,
            hint="add a test/ folder (and optionally val/) with the same class folders",
        )
    found = {split: _read_split(folder) for split, folder in splits.items()}

    class_names = sorted(found["train"])
    if not class_names:
        raise DataError("train/ has no class folders", path=splits["train"], hint=HINT)
    for name in class_names:
        if not found["train"][name]:
            raise DataError(
                f"class folder has no images (looked for {', '.join(IMAGE_EXTENSIONS)})",
                path=splits["train"] / name,
                hint="add training images for the class or remove the folder",
            )
    labels = {name: label for label, name in enumerate(class_names)}
    for split, classes in found.items():
        for name in classes:
            if name not in labels:
                raise DataError(
                    f"class folder {name!r} exists in {split}/ but not in train/",
                    path=splits[split] / name,
                    hint=f"add training images in train/{name}/ or remove {split}/{name}/",
                )

    records = []
    for split, classes in found.items():  # insertion order is SPLITS order
        for name in sorted(classes):
            for file_name in classes[name]:
                path = splits[split] / name / file_name
                records.append(
                    ImageRecord(
                        image_id=len(records) + 1,
                        path=f"{split}/{name}/{file_name}",
                        label=labels[name],
                        split=split,
                        source=path,
                    )
                )
    raw = RawDataset(root=root, class_names=class_names, records=records)
    return raw if allow_outside_root else check_inside_root(raw)
