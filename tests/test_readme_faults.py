"""The README's table of bad inputs and faults is the one the tests' fault markers give."""

from __future__ import annotations

from pathlib import Path

import faults
import pytest

TARGET_KINDS = 25


def test_the_readme_table_is_rendered_from_the_tests():
    table = faults.render(faults.collect())
    block = faults.readme_block(faults.README.read_text())
    assert block is not None, f"README.md has no {faults.BEGIN} ... {faults.END} block"
    assert block == table, (
        "README.md's table of bad inputs and faults differs from the tests' "
        "@pytest.mark.fault markers: run `python -m tests.faults --write`, or replace the "
        "block with:\n\n" + table
    )


def test_enough_kinds_each_with_a_test():
    collected = faults.collect()
    assert len(collected) >= TARGET_KINDS, [fault.kind for fault in collected]
    assert all(fault.tests for fault in collected)


def test_markers_must_be_literal_and_agree(tmp_path: Path):
    (tmp_path / "test_a.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.fault('a bad thing', sees='a message', kept='everything')\n"
        "def test_one():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.fault("
        "'another', sees='b', kept='c'))])\n"
        "def test_two(x):\n    pass\n"
    )
    (tmp_path / "test_b.py").write_text(
        "import pytest\n\n"
        "class TestC:\n"
        "    @pytest.mark.fault('a bad thing', sees='a message', kept='everything')\n"
        "    def test_three(self):\n        pass\n"
    )
    collected = faults.collect(tmp_path)
    assert [(f.kind, f.tests) for f in collected] == [
        ("a bad thing", ["test_a.py::test_one", "test_b.py::TestC::test_three"]),
        ("another", ["test_a.py::test_two"]),
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{faults.BEGIN}\nold\n{faults.END}\n\nafter\n")
    assert faults.write(readme, tmp_path) is True
    assert faults.readme_block(readme.read_text()) == faults.render(collected)
    assert readme.read_text().endswith("\n\nafter\n")
    assert faults.write(readme, tmp_path) is False

    (tmp_path / "test_c.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.fault('a bad thing', sees='another message', kept='everything')\n"
        "def test_four():\n    pass\n"
    )
    with pytest.raises(faults.MarkerError, match=r"test_c\.py::test_four: fault 'a bad thing'"):
        faults.collect(tmp_path)
    (tmp_path / "test_c.py").write_text(
        "import pytest\nKIND = 'k'\n\n"
        "@pytest.mark.fault(KIND, sees='s', kept='k')\ndef test_five():\n    pass\n"
    )
    with pytest.raises(faults.MarkerError, match=r"test_c\.py:4: the fault marker's kind"):
        faults.collect(tmp_path)
