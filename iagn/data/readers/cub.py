"""CUB-200-2011 reader (also reads iagn's synthetic dataset, which uses the same layout).

Layout (the official archive, `CUB_200_2011/`):
    images/<NNN.Class_name>/<file>.jpg
    images.txt               <image_id> <relative path under images/>
    classes.txt              <class_id> <NNN.Class_name>          (1-based)
    image_class_labels.txt   <image_id> <class_id>
    train_test_split.txt     <image_id> <1 = train, 0 = test>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>  (pixels, 0-based origin)
    part_boxes.txt           optional, iagn extension: box of the discriminative part
"""

from __future__ import annotations

from pathlib import Path

from iagn.data.manifest import ImageRecord, RawDataset, check_inside_root
from iagn.data.readers.text import parse_float, parse_int, read_rows, require_file
from iagn.errors import DataError

REQUIRED_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")
PART_BOXES_FILE = "part_boxes.txt"
HINT = "point --data at the unpacked CUB_200_2011 folder (the one holding images.txt)"


def looks_like(root: Path) -> bool:
    return all((root / name).is_file() for name in REQUIRED_FILES)


def _read_id_table(path: Path, columns: int, what: str) -> dict[int, tuple[int, list[str]]]:
    table: dict[int, tuple[int, list[str]]] = {}
    for line, fields in read_rows(path, columns + 1, maxsplit=columns):
        image_id = parse_int(fields[0], path, line, "image id")
        if image_id in table:
            raise DataError(f"{what} for image id {image_id} is given twice", path=path, line=line)
        table[image_id] = (line, fields[1:])
    return table


def _read_boxes(path: Path) -> dict[int, tuple[int, tuple[float, float, float, float]]]:
    boxes = {}
    for image_id, (line, fields) in _read_id_table(path, 4, "box").items():
        x, y, w, h = (parse_float(v, path, line, "box coordinate") for v in fields)
        boxes[image_id] = (line, (x, y, w, h))
    return boxes


def read(root: Path, allow_outside_root: bool = False) -> RawDataset:
    """The dataset at `root`; listed images must lie inside it unless `allow_outside_root`."""
    root = Path(root)
    for name in REQUIRED_FILES:
        require_file(root / name, f"CUB-200-2011 file {name}", HINT)

    class_names = []
    classes_path = root / "classes.txt"
    for expected, (line, fields) in enumerate(read_rows(classes_path, 2, maxsplit=1), start=1):
        class_id = parse_int(fields[0], classes_path, line, "class id")
        if class_id != expected:
            raise DataError(
                f"class ids must run 1, 2, 3, ... in order; found {class_id}, expected {expected}",
                path=classes_path,
                line=line,
            )
        class_names.append(fields[1].strip())

    images = _read_id_table(root / "images.txt", 1, "path")
    labels = _read_id_table(root / "image_class_labels.txt", 1, "label")
    splits = _read_id_table(root / "train_test_split.txt", 1, "split")
    boxes_path = root / "bounding_boxes.txt"
    boxes = _read_boxes(boxes_path) if boxes_path.is_file() else {}
    parts_path = root / PART_BOXES_FILE
    part_boxes = _read_boxes(parts_path) if parts_path.is_file() else {}

    records = []
    for image_id, (line, (rel_path,)) in images.items():
        for table, name in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt")):
            if image_id not in table:
                raise DataError(
                    f"image id {image_id} ({rel_path}) has no entry in {name}",
                    path=root / "images.txt",
                    line=line,
                    hint=f"add the image to {name} or remove it from images.txt",
                )
        label_line, (label_text,) = labels[image_id]
        label = parse_int(label_text, root / "image_class_labels.txt", label_line, "class id")
        split_line, (split_text,) = splits[image_id]
        if split_text not in ("0", "1"):
            raise DataError(
                f"is_training_image must be 1 or 0, found {split_text!r}",
                path=root / "train_test_split.txt",
                line=split_line,
            )
        record = ImageRecord(
            image_id=image_id,
            path=f"images/{rel_path.strip()}",
            label=label - 1,
            split="train" if split_text == "1" else "test",
            source=root / "images.txt",
            line=line,
            locations={"label": (root / "image_class_labels.txt", label_line)},
        )
        box_tables = (("box", boxes, boxes_path), ("part_box", part_boxes, parts_path))
        for kind, table, table_path in box_tables:
            if image_id in table:
                box_line, box = table[image_id]
                setattr(record, kind, box)
                record.locations[kind] = (table_path, box_line)
        records.append(record)
    raw = RawDataset(root=root, class_names=class_names, records=records)
    return raw if allow_outside_root else check_inside_root(raw)
