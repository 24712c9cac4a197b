"""The KFP UI's HTML pages come from templates that escape every value and inline the plots."""

from __future__ import annotations

import base64

from components.pages import evaluation_html, validation_html

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_evaluation_page_shows_the_headline_numbers_and_the_plots_present(tmp_path):
    (tmp_path / "attention_gallery.png").write_bytes(PNG)
    (tmp_path / "confused_pairs.png").write_bytes(PNG)
    metrics = {"kind": "student <b>", "top1": 0.123456, "ece": 0.05, "not_headline": 7}
    page = evaluation_html(metrics, tmp_path, ("top1", "ece", "latency_ms"))

    assert "<title>IAGN student &lt;b&gt;</title>" in page
    assert "<tr><td>top1</td><td>0.1235</td></tr>" in page
    assert "<tr><td>ece</td><td>0.05</td></tr>" in page
    assert "latency_ms" not in page and "not_headline" not in page
    assert "Attention gallery" in page and "Most confused pairs" in page
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in page
    assert "Confusion matrix" not in page  # no file, no empty section


def test_validation_page_escapes_what_the_data_holds():
    document = {
        "success": False,
        "dataset": {"images": 12, "classes": 3, "format": "cub"},
        "expectations": [
            {"name": "readable", "level": "blocking", "success": True},
            {
                "name": "labels",
                "level": "blocking",
                "success": False,
                "description": "every label < classes",
                "observed_value": 2,
                "examples": [{"path": "a/<script>x.jpg", "detail": "label 9 & up"}],
                "hint": "fix image_class_labels.txt",
            },
        ],
    }
    page = validation_html(document)

    assert "<h1>Data validation FAILED</h1>" in page
    assert "12 images, 3 classes" in page
    assert "a/&lt;script&gt;x.jpg: label 9 &amp; up" in page
    assert "<script>" not in page
    assert "every label &lt; classes" in page
    assert "fix image_class_labels.txt" in page
    assert page.count("&#10003;") == 1 and page.count("&#10007;") == 1
    assert "<h1>Data validation passed</h1>" in validation_html({**document, "success": True})
