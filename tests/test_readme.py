"""The README's table of output paths is the layout module's, path for path."""

import re

from conftest import REPO
from snaketune.layout import PATTERNS


def test_the_readme_output_table_lists_exactly_the_layout_patterns():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## What the demo produces", 1)[1].split("\n\n| path | what |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(PATTERNS.values())
    assert len(listed) == len(set(listed))
