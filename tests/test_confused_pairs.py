"""The most confused class pairs and the images picked to show them."""

from __future__ import annotations

import torch

from iagn.evaluation.confused import ConfusedPair, confused_pairs, pick_examples
from iagn.evaluation.plots import confused_pairs_plot


def test_pairs_count_errors_both_ways_most_first():
    # confusion[true, predicted]
    confusion = torch.tensor(
        [
            [5, 3, 0, 0],
            [1, 6, 0, 0],  # 0 <-> 1: 3 + 1 = 4 errors
            [0, 0, 4, 2],
            [0, 0, 2, 5],  # 2 <-> 3: 2 + 2 = 4 errors, a tie: lower classes first
        ]
    )
    confusion[0, 3] = 1  # 0 <-> 3: one error
    pairs = confused_pairs(confusion, top=3)
    assert pairs == [ConfusedPair(0, 1, 3, 1), ConfusedPair(2, 3, 2, 2), ConfusedPair(0, 3, 1, 0)]
    assert [p.errors for p in pairs] == [4, 4, 1]
    assert confused_pairs(confusion, top=1) == pairs[:1]
    assert pairs[0].to_dict(["a", "b", "c", "d"]) == {
        "classes": ["a", "b"],
        "errors": 4,
        "first_as_second": 3,
        "second_as_first": 1,
    }
    # A perfect model confuses nothing: no pair, however many are asked for.
    assert confused_pairs(torch.diag(torch.tensor([3, 4, 5])), top=3) == []


def test_examples_of_both_classes_the_mistaken_ones_first():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 1])
    pair = ConfusedPair(0, 1, 2, 1)
    assert pick_examples(labels, predicted, pair, per_class=2) == [(1, 1), (2, 1), (4, 0), (3, 0)]
    assert pick_examples(labels, predicted, pair, per_class=1) == [(1, 1), (4, 0)]


def test_the_panel_is_written_with_and_without_pairs(tmp_path):
    row = {
        "image": torch.zeros(3, 32, 32),
        "part": torch.tensor([4.0, 4.0, 12.0, 12.0]),
        "pair": "a / b: 2 errors",
        "classes": ("a", "b"),
        "probabilities": (0.4, 0.6),
        "maps": (torch.rand(4, 4), torch.rand(4, 4)),
        "boxes": (torch.tensor([0.0, 0.0, 8.0, 8.0]), torch.tensor([8.0, 8.0, 16.0, 16.0])),
    }
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for rows, name in (([row, {**row, "part": None}], "pairs.png"), ([], "none.png")):
        path = confused_pairs_plot(rows, mean, std, tmp_path / name)
        assert path.read_bytes()[:4] == b"\x89PNG"
