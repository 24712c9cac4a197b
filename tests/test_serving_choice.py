"""How the served box and prediction are chosen, chance levels and the deletion test."""

from __future__ import annotations

import pytest
import torch

from iagn.evaluation import choose
from iagn.evaluation.deletion import _erase
from iagn.evaluation.localization import box_chance, pointing_chance
from iagn.evaluation.serving_config import ServeSettings, ServingConfig, serving_config_of
from iagn.models.attention import boxes_from_maps

SIZE = (32, 32)


def two_blobs(batch: int = 4) -> torch.Tensor:
    """Maps [B, 8, 8]: the peak at the top left, a weaker spot at the bottom right."""
    cam = torch.zeros(batch, 8, 8)
    cam[:, 1:3, 1:3] = 1.0
    cam[:, 5:7, 5:7] = 0.8
    return cam


def test_the_component_box_ignores_a_second_spot_the_threshold_box_spans():
    cam = two_blobs(1)
    spanning = boxes_from_maps(cam, SIZE, 0.5, "threshold")[0]
    component = boxes_from_maps(cam, SIZE, 0.5, "component")[0]
    assert spanning[2] > 24 and spanning[3] > 24  # reaches the bottom-right spot
    assert component[2] <= 14 and component[3] <= 14  # the top-left blob only


def test_the_box_is_chosen_by_validation_box_accuracy():
    seen = {
        "map": two_blobs(),
        "truth": torch.tensor([[4.0, 4.0, 12.0, 12.0]]).repeat(4, 1),
        "usable": torch.ones(4, dtype=torch.bool),
        "size": SIZE,
    }
    settings = ServeSettings(box_methods=("threshold", "component"), box_thresholds=(0.3, 0.5))
    config, scores = choose._choose_box(ServingConfig(), seen, settings)
    assert config.box_method == "component"
    assert scores["threshold@0.5"] == 0.0 and scores["component@0.5"] == 1.0


def test_a_centroid_box_sits_on_the_weighted_centre_of_the_peak_region():
    cam = two_blobs(1)  # the peak blob covers map cells 1..2: pixels 4..12, centre 8
    box = boxes_from_maps(cam, SIZE, 0.5, "centroid", box_size=0.25)[0]
    assert box.tolist() == pytest.approx([4.0, 4.0, 12.0, 12.0], abs=0.6)
    # Near the border the box shifts inside rather than shrink.
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1.0
    box = boxes_from_maps(corner, SIZE, 0.5, "centroid", box_size=0.5)[0]
    assert box.tolist() == [0.0, 0.0, 16.0, 16.0]


def test_without_ground_truth_boxes_the_default_box_stays():
    seen = {"usable": torch.zeros(3, dtype=torch.bool)}
    config, scores = choose._choose_box(ServingConfig(), seen, ServeSettings())
    assert (config.box_method, config.box_threshold, scores) == ("threshold", 0.5, {})


def test_head_weights_fitted_on_validation_favour_the_informative_head():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (400,))
    informative = torch.nn.functional.one_hot(labels, 5).float() * 3 + torch.randn(400, 5)
    noise = torch.randn(400, 5) * 3
    weights = choose.fit_head_weights(torch.stack([noise, informative], dim=1), labels)
    assert weights[1] > 5 * weights[0]
    assert all(w > 0 for w in weights)


def test_serving_configuration_round_trips_and_old_checkpoints_keep_their_prediction():
    config = ServingConfig(
        aggregation="weighted",
        weights=(0.1, 0.2, 0.3, 0.4),
        box_method="component",
        box_threshold=0.6,
        temperature=0.7,
        chosen_on={"split": "val", "images": 10},
    )
    assert ServingConfig.from_dict(config.to_dict()) == config
    assert serving_config_of({"serving": config.to_dict()}) == config
    legacy = serving_config_of({"kind": "teacher", "calibration": {"temperature": 0.5}})
    assert (legacy.aggregation, legacy.temperature) == ("two_pass", 0.5)
    assert serving_config_of({"kind": "student"}).aggregation == "student"
    with pytest.raises(ValueError, match="unknown aggregation"):
        ServingConfig(aggregation="vote")


def test_bad_serve_settings_are_named():
    from iagn.errors import IagnError
    from iagn.train.config import serve_settings

    with pytest.raises(IagnError, match=r"aggregations: unknown \['vote'\]"):
        serve_settings({"serve": {"aggregations": ["vote"]}})
    with pytest.raises(IagnError, match="box_thresholds"):
        serve_settings({"serve": {"box_thresholds": [1.5]}})
    assert serve_settings({}) == ServeSettings()  # params files from before the section


def test_chance_levels():
    truth = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0]])
    assert pointing_chance(truth, SIZE).tolist() == [0.25, 1.0]
    generator = torch.Generator().manual_seed(0)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    assert box_chance(whole, whole, SIZE, generator).item() == 1.0  # nowhere else to go
    tiny_box, tiny_truth = torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[0, 0, 4, 4.0]])
    assert box_chance(tiny_box, tiny_truth, SIZE, generator).item() < 0.1


def test_erase_removes_exactly_the_top_scoring_pixels():
    images = torch.ones(2, 3, 4, 4)
    scores = torch.arange(32.0).view(2, 16)
    erased = _erase(images, scores, 5)
    assert (erased[:, 0] == 0).flatten(1).sum(1).tolist() == [5, 5]
    assert erased[0, :, 3, 3].eq(0).all() and erased[0, :, 0, 0].eq(1).all()


def test_a_two_pass_that_wins_on_validation_is_served_and_calibrated(monkeypatch):
    """When the crop helps on the validation split, two-pass is chosen, its temperature is
    fitted on the two-pass logits, and the record names it."""
    from iagn.models.iagn import IAGN, ModelConfig

    torch.manual_seed(0)
    model = IAGN(ModelConfig(num_classes=3, stage_channels=8)).eval()
    images = torch.randn(12, 3, 32, 32)
    labels = torch.arange(12) % 3
    batch = {
        "image": images,
        "label": labels,
        "boxes": torch.zeros(12, 2, 4),
        "box_valid": torch.zeros(12, 2, dtype=torch.bool),
    }
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 50

    def crops_that_know(model, config, loader, device):
        full = choose._served_logits(
            config, choose._one_pass_outputs(choose.Predictor(model, config, device), loader)
        )
        return full, perfect

    monkeypatch.setattr(choose, "_crop_logits", crops_that_know)
    config, fitted = choose.choose_serving(model, [batch], torch.device("cpu"), ServeSettings())
    # Both crop weights reach 1.0: a tie keeps the first listed.
    assert config.aggregation == "two_pass" and config.crop_weight == 0.25
    assert config.chosen_on["top1_served"] == 1.0
    assert config.temperature == fitted["temperature"] and fitted["images"] == 12


def test_only_two_pass_listed_serves_two_pass(monkeypatch):
    from iagn.models.iagn import IAGN, ModelConfig

    model = IAGN(ModelConfig(num_classes=3, stage_channels=8)).eval()
    batch = {
        "image": torch.randn(6, 3, 32, 32),
        "label": torch.arange(6) % 3,
        "boxes": torch.zeros(6, 2, 4),
        "box_valid": torch.zeros(6, 2, dtype=torch.bool),
    }
    settings = ServeSettings(aggregations=("two_pass",), crop_weights=(0.25,))
    config, _ = choose.choose_serving(model, [batch], torch.device("cpu"), settings)
    assert (config.aggregation, config.base, config.crop_weight) == ("two_pass", "combined", 0.25)
