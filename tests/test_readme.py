"""The README's set-up commands are the ones CI runs, and the run command installs what napari needs."""

import re

from conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    commands = _bash_blocks(setup)
    assert len(commands) == 2, "the README must have exactly two set-up commands"
    assert all("\n" not in c for c in commands), "each set-up command is one line, copied as a whole"
    return commands


def _pins(command: str) -> list[str]:
    return re.findall(r"\b(torch(?:vision)?==[\w.+]+)", command)


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = _setup_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_the_run_command_installs_the_system_libraries_then_the_package_then_starts_the_app():
    """On a fresh Debian/Ubuntu machine Qt aborts without libxcb-cursor0 & co.: the run command must install them
    first (the same script as the test command), with the same torch pins, and end by starting the app."""
    run_command, test_command = _setup_commands()
    steps = [step.strip() for step in run_command.split("&&")]
    assert steps[0] == "bash scripts/install-system-deps.sh" == test_command.split("&&")[0].strip()
    assert (REPO / "scripts" / "install-system-deps.sh").is_file()
    assert steps[1].startswith("python -m pip install ") and steps[1].split()[-1] == "."
    assert _pins(steps[1]) == _pins(test_command) and len(_pins(steps[1])) == 2
    assert steps[-1].split()[0] == "napari-robustmedsam"
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'napari-robustmedsam = "napari_robustmedsam.launch:main"' in scripts


def test_the_readme_is_a_short_guide_that_defines_its_terms():
    readme = (REPO / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.lstrip().startswith("|"))
    assert len(prose.split()) <= 1300, "keep the README a user's guide: measurements go to docs/results/"
    first_lq = readme.index("LQ-")
    assert "**LQ-1** light" in readme[first_lq - 200 : first_lq + 200], "define the levels where they first appear"
    assert "../shared" not in readme
    for image in re.findall(r"\]\((docs/images/[^)]+)\)", readme):
        assert (REPO / image).is_file(), image
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).exists(), link


def test_manifest_is_shipped_inside_the_package():
    link = REPO / "src" / "napari_robustmedsam" / "napari.yaml"
    assert link.resolve() == (REPO / "napari.yaml").resolve()
