"""docs/reliability.md names real tests: every `test_<file>.py::<test>` it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_fault_table_cites_exists():
    text = (REPO / "docs/reliability.md").read_text()
    cited = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", text))
    assert len(cited) >= 30
    defined: dict[str, set[str]] = {}
    for file in {file for file, _ in cited}:
        tree = ast.parse((REPO / "tests" / file).read_text())
        defined[file] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    missing = sorted(f"{file}::{name}" for file, name in cited if name not in defined[file])
    assert not missing, missing
