"""The documentation cannot drift from the code: every command in the README and docs/ composes, the cheap ones
run, every script takes --help, every link points at a file that exists, and the README stays short."""
from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, REPO, run_script
from metalstm.assembly import SCHEMAS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY = re.compile(r"(?:^|\s|`)((?:[A-Z_]+=\S+ )*python (?:train|eval|predict)\.py\b[^`\n#]*)")
SCRIPT = re.compile(r"python (scripts/\w+\.py)")


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every train/eval/predict command in a code block or inline code of the pages."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            for match in ENTRY.finditer(line):
                command = match.group(1).strip().rstrip("`").strip()
                if "..." not in command and "<p>" not in command:  # an elided command in prose
                    found.append((page.name, command))
    return sorted(set(found))


COMMANDS = documented_commands()


def test_the_pages_document_many_commands():
    assert len(COMMANDS) > 40 and {p for p, _ in COMMANDS} >= {"README.md", "workflow.md", "data.md"}


def overrides_of(command: str) -> tuple[str, list[str]]:
    """The script and the overrides a command line composes (a sweep's first value of each swept key)."""
    words = shlex.split(re.sub(r"<[^>]*>", "x", command))  # outputs/<date>/<time>: the reader fills it in
    words = words[next(i for i, w in enumerate(words) if w == "python") + 1:]
    script, rest = words[0][: -len(".py")], words[1:]
    overrides = []
    for word in rest:
        if word in ("-m", "--cfg", "job", "--multirun"):
            continue
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):  # key=a,b,c sweeps; the first value composes the same way
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return script, overrides


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_composes(page, command):
    script, overrides = overrides_of(command)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(script, overrides=overrides)
    if script == "train" and not any(o.startswith("resume=") for o in overrides):
        config = OmegaConf.to_container(cfg, resolve=False)
        for group, registry in SCHEMAS.items():  # every setting the command gives is a setting, of the right kind
            registry.parse(config[group])


def test_the_cheap_documented_commands_run(tmp_path):
    cheap = sorted({c for _, c in COMMANDS if c.endswith(("debug=fdr", "--cfg job"))})
    assert cheap
    for command in cheap:
        result = run_script(f"{overrides_of(command)[0]}.py", *shlex.split(command)[2:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr[-2000:])


def test_every_documented_script_answers_help(tmp_path):
    scripts = sorted({m for page in PAGES for m in SCRIPT.findall(page.read_text())})
    assert "scripts/compare_runs.py" in scripts and "scripts/reproduce.py" in scripts
    for script in scripts:
        result = run_script(script, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (script, result.stderr[-1000:])


def test_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), (page.name, target)


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
