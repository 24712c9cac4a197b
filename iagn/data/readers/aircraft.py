"""FGVC-Aircraft 2013b reader.

Layout (the official archive, `fgvc-aircraft-2013b/`; the root may be that folder or its
`data/` folder):
    data/images/<image id>.jpg
    data/images_variant_{train,val,test}.txt        <image id> <variant name, may have spaces>
    data/images_family_{train,val,test}.txt         <image id> <family name>
    data/images_manufacturer_{train,val,test}.txt   <image id> <manufacturer name>
    data/images_box.txt                             <image id> <xmin> <ymin> <xmax> <ymax>
    data/variants.txt, families.txt, manufacturers.txt
                                                    one class name per line; the line order
                                                    defines the labels (0-based)

`level` picks the label hierarchy: "variant" (100 classes), "family" (70) or
"manufacturer" (30). Image ids are digit strings such as `0034309`: the file name keeps them
as written, the manifest image_id is their integer value. Boxes are 1-based inclusive pixel
corners and become x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1.

The official images carry a 20-pixel copyright banner at the bottom. It is kept (the
manifest describes the files as they are); the boxes lie above it and are unaffected.
"""

from __future__ import annotations

from pathlib import Path

from iagn.data.manifest import ImageRecord, RawDataset, check_inside_root
from iagn.data.readers.text import parse_float, read_rows, require_file
from iagn.errors import DataError

LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
SPLITS = ("train", "val", "test")
BOX_FILE = "images_box.txt"
MARKER_FILES = ("images_variant_train.txt", BOX_FILE)
HINT = (
    "point --data at the unpacked fgvc-aircraft-2013b folder (the one holding data/) or at its "
    "data/ folder; re-extract the archive if files are missing"
)


def _data_dir(root: Path) -> Path | None:
    for folder in (root / "data", root):
        if all((folder / name).is_file() for name in MARKER_FILES):
            return folder
    return None


def looks_like(root: Path) -> bool:
    return _data_dir(Path(root)) is not None


def _read_class_names(path: Path) -> dict[str, int]:
    require_file(path, f"FGVC-Aircraft class list {path.name}", HINT)
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            name = line.strip()
            if not name:
                continue
            if name in labels:
                raise DataError(
                    f"class {name!r} is listed twice",
                    path=path,
                    line=number,
                    hint="each class name may appear once; re-extract the archive",
                )
            labels[name] = len(labels)
    if not labels:
        raise DataError("the class list is empty", path=path, hint=HINT)
    return labels


def _read_boxes(path: Path) -> dict[str, tuple[int, tuple[float, float, float, float]]]:
    boxes: dict[str, tuple[int, tuple[float, float, float, float]]] = {}
    for line, fields in read_rows(path, 5):
        image_id = fields[0]
        if image_id in boxes:
            raise DataError(
                f"box for image {image_id} is given twice (first on line {boxes[image_id][0]})",
                path=path,
                line=line,
                hint="keep one box per image",
            )
        x1, y1, x2, y2 = (parse_float(v, path, line, "box coordinate") for v in fields[1:5])
        boxes[image_id] = (line, (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1))
    return boxes


def read(root: Path, level: str | None = "variant", allow_outside_root: bool = False) -> RawDataset:
    """Read the dataset labelled at `level` ("variant", "family" or "manufacturer"); listed
    images must lie inside `root` unless `allow_outside_root`."""
    root = Path(root)
    level = level or "variant"
    if level not in LEVELS:
        raise DataError(
            f"unknown FGVC-Aircraft label level {level!r}",
            hint=f"use one of: {', '.join(LEVELS)}",
        )
    data = _data_dir(root)
    if data is None:
        # Name the file a user is most likely missing, in the layout they most likely have.
        data = root if root.name == "data" else root / "data"
        for name in MARKER_FILES:
            require_file(data / name, f"FGVC-Aircraft file {name}", HINT)
    prefix = data.relative_to(root).as_posix()
    image_prefix = "images" if prefix == "." else f"{prefix}/images"

    labels = _read_class_names(data / LEVELS[level])
    box_path = data / BOX_FILE
    boxes = _read_boxes(box_path)

    records = []
    seen: dict[int, tuple[Path, int]] = {}
    for split in SPLITS:
        split_path = require_file(
            data / f"images_{level}_{split}.txt", f"FGVC-Aircraft {split} split list", HINT
        )
        for line, (image_id, class_name) in read_rows(split_path, 2, maxsplit=1):
            class_name = class_name.strip()
            if not image_id.isdigit():
                raise DataError(
                    f"image id {image_id!r} is not a string of digits",
                    path=split_path,
                    line=line,
                    hint="FGVC-Aircraft image ids are the digits of the image file name",
                )
            if class_name not in labels:
                raise DataError(
                    f"{level} {class_name!r} of image {image_id} is not in {LEVELS[level]}",
                    path=split_path,
                    line=line,
                    hint=f"add the class to {data / LEVELS[level]} or fix the name",
                )
            number = int(image_id)
            if number in seen:
                first_path, first_line = seen[number]
                raise DataError(
                    f"image id {image_id} is listed twice (first in {first_path.name}, "
                    f"line {first_line})",
                    path=split_path,
                    line=line,
                    hint="list every image in exactly one split",
                )
            seen[number] = (split_path, line)
            record = ImageRecord(
                image_id=number,
                path=f"{image_prefix}/{image_id}.jpg",
                label=labels[class_name],
                split=split,
                source=split_path,
                line=line,
            )
            # Like CUB: an image without a box gets NaN; the official files box them all.
            if image_id in boxes:
                box_line, record.box = boxes[image_id]
                record.locations["box"] = (box_path, box_line)
            records.append(record)
    class_names = sorted(labels, key=labels.__getitem__)
    raw = RawDataset(root=root, class_names=class_names, records=records)
    return raw if allow_outside_root else check_inside_root(raw)
