"""The class pairs a model confuses most, and the test images that show where it looked.

A fine-grained model's errors are mostly between look-alike classes. The confusion is
symmetrised (A taken for B plus B taken for A), so a pair counts once whichever way the
errors go; the top pairs with at least one error are reported. For each pair, a few test
images of both classes are picked, images the model took for the other class first: their
panel (iagn/evaluation/plots.py `confused_pairs_plot`) shows the attention map for the true
class beside the map for the confusing class, with both classes' probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConfusedPair:
    first: int
    second: int
    first_as_second: int  # images of `first` predicted as `second`
    second_as_first: int

    @property
    def errors(self) -> int:
        return self.first_as_second + self.second_as_first

    def to_dict(self, class_names: list[str]) -> dict:
        return {
            "classes": [class_names[self.first], class_names[self.second]],
            "errors": self.errors,
            "first_as_second": self.first_as_second,
            "second_as_first": self.second_as_first,
        }


def confused_pairs(confusion: torch.Tensor, top: int) -> list[ConfusedPair]:
    """The `top` pairs of classes with the most errors between them, most first (ties: the
    lower class indices first); pairs without an error are left out.

    confusion[t, p]: images of true class t predicted as p."""
    confusion = confusion.long()
    both_ways = torch.triu(confusion + confusion.T, diagonal=1)
    firsts, seconds = torch.nonzero(both_ways, as_tuple=True)
    pairs = [
        ConfusedPair(a, b, int(confusion[a, b]), int(confusion[b, a]))
        for a, b in zip(firsts.tolist(), seconds.tolist(), strict=True)
    ]
    pairs.sort(key=lambda pair: (-pair.errors, pair.first, pair.second))
    return pairs[: max(top, 0)]


def pick_examples(
    labels: torch.Tensor, predicted: torch.Tensor, pair: ConfusedPair, per_class: int
) -> list[tuple[int, int]]:
    """(image index, confusing class) for up to `per_class` images of each class of `pair`:
    those taken for the other class first, then the others, each in dataset order."""
    picked = []
    for own, other in ((pair.first, pair.second), (pair.second, pair.first)):
        mine = torch.nonzero(labels == own).flatten().tolist()
        mistaken = [i for i in mine if int(predicted[i]) == other]
        rest = [i for i in mine if int(predicted[i]) != other]
        picked += [(index, other) for index in (mistaken + rest)[:per_class]]
    return picked
