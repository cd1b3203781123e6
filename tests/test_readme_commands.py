"""Every recipe command of README.md and docs/*.md (```bash blocks) and every config file under recipes/configs parses
into a valid config with the recipe's own parser, so a renamed or removed flag in the documentation fails here (the
end-to-end runs of the commands are in the recipe and sweep tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmexperts.training import TrainConfig, parse_config
from mmexperts.training.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO_CONFIG = ROOT / "recipes" / "configs" / "mope_synthetic.yaml"
RECIPES = {"recipes/train.py": TrainConfig, "recipes/sweep_s3.py": SweepConfig}


def recipe_commands() -> list[tuple[str, str, list[str]]]:
    """(document, recipe, arguments) of each command line that runs a recipe in a ```bash block."""
    found = []
    for path in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                recipe = next((word for word in words if word in RECIPES), None)
                if recipe is not None:
                    found.append((path.name, recipe, words[words.index(recipe) + 1:]))
    return found


COMMANDS = recipe_commands()


def test_the_documents_show_commands_of_both_recipes():
    assert {recipe for _, recipe, _ in COMMANDS} == set(RECIPES)


@pytest.mark.parametrize("document, recipe, arguments", COMMANDS,
                         ids=[f"{doc}:{' '.join(args) or recipe}" for doc, recipe, args in COMMANDS])
def test_documented_recipe_command_parses(document, recipe, arguments, monkeypatch):
    if "--help" in arguments:
        with pytest.raises(SystemExit) as stop:
            parse_config(arguments, default_config=DEMO_CONFIG, config_class=RECIPES[recipe])
        assert stop.value.code == 0
        return
    monkeypatch.chdir(ROOT)  # the documents' paths are relative to the repository
    default = DEMO_CONFIG if recipe == "recipes/train.py" else None
    config = parse_config(arguments, default_config=default, config_class=RECIPES[recipe])
    assert isinstance(config, RECIPES[recipe])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_config_file_parses(path):
    config_class = SweepConfig if "sweep" in path.stem else TrainConfig
    config = parse_config(["--config", str(path)], config_class=config_class)
    assert isinstance(config, config_class)
