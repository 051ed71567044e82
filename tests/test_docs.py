"""README.rst and CHANGES.rst are what a newcomer reads first (and the
package's long description): they must render without a docutils warning."""

from __future__ import annotations

import io
import re
from pathlib import Path

import docutils.core
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.rst", "CHANGES.rst"])
def test_renders_without_warnings(name):
    warnings = io.StringIO()
    docutils.core.publish_doctree(
        (ROOT / name).read_text(),
        source_path=name,
        settings_overrides={"warning_stream": warnings, "report_level": 2, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_no_merge_leftovers():
    for path in [*ROOT.glob("*.rst"), *ROOT.glob("crushd/**/*.*"), *ROOT.glob("tests/*.py")]:
        if path.suffix not in (".rst", ".py", ".json", ".js", ".html", ".css", ".cfg"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not line.startswith(("<<<<<<< ", ">>>>>>> ")), f"{path}:{number}"


def test_layout_lists_every_module():
    """README's Layout table has one row per module of the package, and no
    row for a module that is gone."""
    text = (ROOT / "README.rst").read_text()
    layout = text[text.index("Layout\n======") :]
    listed = set(re.findall(r"^``(crushd/\S+\.py)``", layout, re.MULTILINE))
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "crushd").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert listed == modules
