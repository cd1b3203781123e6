"""The complete Python examples (```python blocks) of README.md and docs/*.md run as written; ```py blocks are API
sketches."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCUMENTS = [README, *sorted((README.parent / "docs").glob("*.md"))]
BLOCKS = [(path.name, block) for path in DOCUMENTS
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]


@pytest.mark.parametrize("document, block", BLOCKS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(BLOCKS)])
def test_readme_python_example_runs(document, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{document} example", "exec"), {"__name__": "__readme__"})
