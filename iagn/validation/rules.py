"""The validation rules: each one Great Expectations expectation, configurable in params.yaml.

A rule names the table it checks (`images`: one row per listed image; `classes`: one row
per class and split), the GX expectation that expresses it, a sentence for reports, what to
do when it fails, and how to describe an offending row. This module does not import GX
(slow to import): `iagn.validation.gx` builds the expectation objects from `Rule.gx_type`
and `Rule.gx_kwargs`.

params.yaml, section `validate` (every key optional; defaults below):

    decode_sample: null      # null: fully decode every image; N: a seeded sample of N
    workers: 0               # decoding processes; 0 = all cores
    max_examples: 5          # offending rows listed per failed expectation
    expectations:
      <rule name>: {enabled: true, level: blocking | warning, <rule options>}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from iagn.data.manifest import SPLITS
from iagn.errors import IagnError

LEVELS = ("blocking", "warning")
TOP_LEVEL_KEYS = ("decode_sample", "workers", "max_examples", "expectations")


@dataclass(frozen=True)
class Rule:
    """One expectation of the suite. `options` maps option name -> default value."""

    name: str
    table: str  # "images" or "classes"
    gx_type: str  # class name in great_expectations.expectations
    gx_kwargs: Callable[[dict, int], dict]  # (options, num_classes) -> expectation kwargs
    summary: str  # what is checked; formatted with the options and num_classes
    hint: str  # what to do when it fails
    detail: Callable[[pd.Series, dict, int], str]  # one offending row -> text
    options: dict[str, Any] = field(default_factory=dict)
    level: str = "blocking"
    # For an aggregate expectation (no offending rows of its own): the rows to show instead.
    example_rows: Callable[[pd.DataFrame], pd.DataFrame] | None = None

    def describe(self, options: dict, num_classes: int) -> str:
        return self.summary.format(**options, last_label=num_classes - 1)


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _largest_and_smallest_train_class(classes: pd.DataFrame) -> pd.DataFrame:
    train = classes[classes["split"] == "train"].sort_values("count", kind="stable")
    return train.iloc[[-1, 0]] if len(train) else train


RULES: tuple[Rule, ...] = (
    Rule(
        "unique_image_ids",
        "images",
        "ExpectColumnValuesToBeUnique",
        lambda o, n: {"column": "image_id"},
        "every image id is listed once",
        "give every image its own id in the dataset's listing",
        lambda r, o, n: f"image id {r['image_id']} is listed more than once ({r['listed_at']})",
    ),
    Rule(
        "unique_paths",
        "images",
        "ExpectColumnValuesToBeUnique",
        lambda o, n: {"column": "path"},
        "every image file is listed once",
        "remove the repeated entries from the dataset's listing",
        lambda r, o, n: (
            f"listed more than once (here as image id {r['image_id']}, {r['listed_at']})"
        ),
    ),
    Rule(
        "files_exist",
        "images",
        "ExpectColumnValuesToBeInSet",
        lambda o, n: {"column": "exists", "value_set": [True]},
        "every listed image file exists",
        "restore the files (`dvc pull`, or re-extract the dataset archive) or remove them "
        "from the listing",
        lambda r, o, n: "file does not exist",
    ),
    Rule(
        "images_decode",
        "images",
        "ExpectColumnValuesToBeNull",
        lambda o, n: {"column": "decode_error"},
        "every image decodes completely (no truncated or corrupt files)",
        "replace the broken files with good copies (`dvc pull`, re-download) or remove them "
        "from the listing",
        lambda r, o, n: r["decode_error"],
    ),
    Rule(
        "rgb_convertible",
        "images",
        "ExpectColumnValuesToBeNull",
        lambda o, n: {"column": "rgb_error"},
        "every image converts to 8-bit RGB without losing data",
        "convert these images to 8-bit RGB (rescale 16-bit/float data to 0..255 first)",
        lambda r, o, n: r["rgb_error"],
    ),
    Rule(
        "label_in_range",
        "images",
        "ExpectColumnValuesToBeBetween",
        lambda o, n: {"column": "label", "min_value": 0, "max_value": n - 1},
        "every label is a class of the class list (0..{last_label})",
        "fix the labels in the annotation file, or add the missing classes to the class list",
        lambda r, o, n: (
            f"label {r['label']} (class id {r['label'] + 1} at {r['label_at']}) is outside the "
            f"class list 0..{n - 1}"
        ),
    ),
    Rule(
        "class_names_consistent",
        "images",
        "ExpectColumnValuesToBeNull",
        lambda o, n: {"column": "class_name_problem"},
        "one class name per label and one label per class name",
        "give every class its own name in the class list",
        lambda r, o, n: r["class_name_problem"],
    ),
    Rule(
        "valid_splits",
        "images",
        "ExpectColumnValuesToBeInSet",
        lambda o, n: {"column": "split", "value_set": list(SPLITS)},
        "every split is one of train, val, test",
        "put every image into train, val or test",
        lambda r, o, n: f"split {r['split']!r}",
    ),
    Rule(
        "min_images_per_class",
        "classes",
        "ExpectColumnValuesToBeBetween",
        lambda o, n: {"column": "count", "min_value": o["min_count"]},
        "every class has at least {min_count} images in each split",
        "add images to these classes, merge or drop the classes, or lower "
        "validate.expectations.min_images_per_class.min_count",
        lambda r, o, n: f"{_images(r['count'])}, fewer than {o['min_count']}",
        options={"min_count": 10},
    ),
    Rule(
        "no_leakage",
        "images",
        "ExpectColumnValuesToBeNull",
        lambda o, n: {"column": "leak"},
        "no image content is shared between train/val and test",
        "remove each duplicate from one side, so no test image is also in train or val",
        lambda r, o, n: r["leak"],
    ),
    Rule(
        "boxes_valid",
        "images",
        "ExpectColumnValuesToBeNull",
        lambda o, n: {"column": "box_problem"},
        "object and part boxes have positive area and lie inside the image",
        "fix the boxes in the annotation file (e.g. bounding_boxes.txt) or remove the images",
        lambda r, o, n: r["box_problem"],
    ),
    Rule(
        "min_image_width",
        "images",
        "ExpectColumnValuesToBeBetween",
        lambda o, n: {"column": "width", "min_value": o["min_width"]},
        "every image is at least {min_width} px wide",
        "replace or drop the small images, or lower validate.expectations.min_image_width"
        ".min_width",
        lambda r, o, n: f"{r['width']:.0f}x{r['height']:.0f} px, narrower than {o['min_width']}",
        options={"min_width": 64},
    ),
    Rule(
        "min_image_height",
        "images",
        "ExpectColumnValuesToBeBetween",
        lambda o, n: {"column": "height", "min_value": o["min_height"]},
        "every image is at least {min_height} px high",
        "replace or drop the small images, or lower validate.expectations.min_image_height"
        ".min_height",
        lambda r, o, n: f"{r['width']:.0f}x{r['height']:.0f} px, lower than {o['min_height']}",
        options={"min_height": 64},
    ),
    Rule(
        "max_class_imbalance",
        "classes",
        "ExpectColumnMaxToBeBetween",
        lambda o, n: {"column": "train_ratio", "max_value": o["max_ratio"]},
        "the largest train class has at most {max_ratio}x the images of the smallest",
        "collect more images of the small classes, use a class-balanced sampler, or raise "
        "validate.expectations.max_class_imbalance.max_ratio",
        lambda r, o, n: f"{_images(r['count'])} (label {r['label']})",
        options={"max_ratio": 3.0},
        level="warning",  # imbalance degrades a model; it does not make the data wrong
        example_rows=_largest_and_smallest_train_class,
    ),
)
RULES_BY_NAME = {rule.name: rule for rule in RULES}


@dataclass(frozen=True)
class RuleSettings:
    enabled: bool
    level: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ValidateConfig:
    decode_sample: int | None
    workers: int
    max_examples: int
    rules: dict[str, RuleSettings]

    def active(self) -> list[tuple[Rule, RuleSettings]]:
        """The enabled rules, in the suite's order."""
        return [(r, self.rules[r.name]) for r in RULES if self.rules[r.name].enabled]


def _fail(key: str, problem: str) -> IagnError:
    return IagnError(f"params.yaml `validate.{key}` {problem}")


def _whole_number(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"must be a whole number >= {minimum}, got {value!r}")
    return value


def _rule_settings(rule: Rule, given: Any) -> RuleSettings:
    key = f"expectations.{rule.name}"
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise _fail(key, f"must be a mapping (enabled, level, options), got {given!r}")
    known = {"enabled", "level", *rule.options}
    unknown = sorted(set(given) - known)
    if unknown:
        raise _fail(key, f"has unknown keys {unknown}; known: {sorted(known)}")
    enabled = given.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail(f"{key}.enabled", f"must be true or false, got {enabled!r}")
    level = given.get("level", rule.level)
    if level not in LEVELS:
        raise _fail(f"{key}.level", f"must be one of {LEVELS}, got {level!r}")
    options = {}
    for name, default in rule.options.items():
        value = given.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _fail(f"{key}.{name}", f"must be a non-negative number, got {value!r}")
        options[name] = value
    return RuleSettings(enabled=enabled, level=level, options=options)


def parse_config(section: dict[str, Any]) -> ValidateConfig:
    """Check the `validate` section of params.yaml and fill in the defaults."""
    unknown = sorted(set(section) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise IagnError(
            f"params.yaml `validate` has unknown keys {unknown}; known: {list(TOP_LEVEL_KEYS)}"
        )
    sample = section.get("decode_sample")
    if sample is not None:
        sample = _whole_number(sample, "decode_sample", 1)
    workers = _whole_number(section.get("workers", 0), "workers", 0) or os.cpu_count() or 1
    max_examples = _whole_number(section.get("max_examples", 5), "max_examples", 1)
    given = section.get("expectations") or {}
    if not isinstance(given, dict):
        raise _fail("expectations", "must be a mapping of expectation name -> settings")
    unknown = sorted(set(given) - set(RULES_BY_NAME))
    if unknown:
        raise _fail("expectations", f"has unknown names {unknown}; known: {list(RULES_BY_NAME)}")
    rules = {rule.name: _rule_settings(rule, given.get(rule.name)) for rule in RULES}
    return ValidateConfig(sample, workers, max_examples, rules)
