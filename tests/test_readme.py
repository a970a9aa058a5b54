"""The README's set-up commands are the ones CI runs: keep them from drifting apart."""

import re

from conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    commands = _bash_blocks(setup)
    assert len(commands) == 2, "the README must have exactly two set-up commands"
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines
    assert "robustmedsam" in commands[0]


def test_manifest_is_shipped_inside_the_package():
    link = REPO / "src" / "napari_robustmedsam" / "napari.yaml"
    assert link.resolve() == (REPO / "napari.yaml").resolve()
