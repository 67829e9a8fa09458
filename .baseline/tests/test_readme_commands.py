"""The README's two fresh-machine commands are what CI runs (.ci/run) and what a new user types."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _readme_commands() -> list[str]:
    """The indented command lines of the README's "Fresh machine: two commands" section."""
    section = re.search(r"^## Fresh machine.*?(?=^## )", _read("README.md"), re.S | re.M).group(0)
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_ci_runs_the_readme_test_command():
    test_cmd = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_cmd) == 1, _readme_commands()
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert test_cmd[0] in ci_lines, f".ci/run does not run the README's test command {test_cmd[0]!r}"


def test_ci_builds_a_fresh_virtual_environment():
    ci = _read(".ci", "run")
    venv = ci.index("-m venv")
    assert "--system-site-packages" not in ci
    assert venv < ci.index("source ") < ci.index("pip install"), "the install must run inside the new venv"
    assert "mktemp -d" in ci and "trap 'rm -rf" in ci, "a new folder each run, removed afterwards"


def test_readme_main_command_installs_and_runs_generate():
    main_cmd = [c for c in _readme_commands() if "pixtral_rt.generate" in c]
    assert len(main_cmd) == 1 and main_cmd[0].startswith("pip install "), _readme_commands()
