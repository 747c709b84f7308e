"""Every command the README shows runs as written after its set-up: the tool is one set-up installs (or a
shell built-in), every `scfrisk` subcommand and option exists, and every repository file it names is there."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import typer

from pipelines.cli import app
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent
"""What `make setup` installs: the project's environment, activated by `source .venv/bin/activate`."""
BUILTINS = {"export", "source", "kill", "cd", "cat"}
HTTP_CLIENT = {"curl"}
"""The loan engine's side of the scoring example, which the README says any HTTP client can play."""
TOOLS = ("scfrisk", ".venv/bin/scfrisk", "mlflow", "prefect", "python", "make", "uv", "uvx", "source", "pip")
"""First words that make an inline code span a command to check."""
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SUBSTITUTION = re.compile(r"\$\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def _block_commands(text: str) -> list[str]:
    """The commands of the bash blocks; a here-document's lines are the command's input, not commands."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        until = None
        for line in block.replace("\\\n", " ").splitlines():
            if until is not None:
                until = None if line.strip() == until else until
            elif line.strip():
                commands.append(line)
                heredoc = re.search(r"<<-?\s*'?\"?(\w+)", line)
                until = heredoc and heredoc.group(1)
    return commands


def _inline_commands(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]
    return [s for s in spans if len(_words(s)) > 1 and _words(s)[0] in TOOLS]  # one word names, not runs


def _words(command: str) -> list[str]:
    words = shlex.split(SUBSTITUTION.sub("VALUE", command), comments=True)
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    return words


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M))


def _check_scfrisk(words: list[str], command: str) -> None:
    group: typer.main.TyperGroup = typer.main.get_command(app)
    options = {o for p in group.params for o in p.opts}
    node, rest = group, words[1:]
    while rest and hasattr(node, "commands") and rest[0] in node.commands:
        node, rest = node.commands[rest[0]], rest[1:]
    assert not hasattr(node, "commands") or rest == ["--help"] or not rest, f"no such subcommand: {command}"
    options |= {o for p in node.params for o in p.opts} | {"--help"}
    for word in rest:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{word} is not an option of: {command}"


def _problems(command: str) -> list[str]:
    problems = []
    for inner in SUBSTITUTION.findall(command):
        problems += _problems(inner)
    words = _words(command)
    if not words:
        return problems
    tool = words[0]
    if tool in ("scfrisk", ".venv/bin/scfrisk"):
        try:
            _check_scfrisk(words, command)
        except AssertionError as exc:
            problems.append(str(exc))
    elif tool == "make":
        problems += [f"no make target {t}: {command}" for t in words[1:] if t not in _make_targets()]
    elif tool == "source":
        problems += [] if words[1:] == [".venv/bin/activate"] else [f"sources what set-up does not make: {command}"]
    elif tool not in BUILTINS | HTTP_CLIENT and not (VENV_BIN / tool).exists():
        problems.append(f"'{tool}' is not installed by set-up (not in .venv/bin, not a shell built-in): {command}")
    for word in words:
        path = word.split("=")[-1]
        if path.startswith(("data_samples/", "docs/", "tests/")) and not (REPO / path).exists():
            problems.append(f"{path} is not in the repository: {command}")
    return problems


def test_every_command_the_readme_shows_is_runnable_after_set_up():
    commands = _block_commands(README) + _inline_commands(README)
    assert len(commands) >= 15
    problems = [p for command in commands for p in _problems(command)]
    assert not problems, "\n".join(problems)


def test_the_set_up_comes_before_the_commands_that_need_it():
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "scfrisk --help" in b)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    assert lines[:2] == ["make setup", "source .venv/bin/activate"]


def test_the_readme_points_to_the_public_tables_and_their_targets():
    assert "(data_samples/public/README.md)" in README
    public = (REPO / "data_samples" / "public" / "README.md").read_text()
    for table, target in re.findall(r"`--table (\S+) --target (\S+)`", public):
        if table in README:
            assert f"--target {target}" in " ".join(README.split())


def test_the_checker_catches_what_a_new_user_hit():
    assert _problems("uv run scfrisk --help")
    assert _problems("SCFRISK_API_KEYS=$(openssl rand -hex 20) scfrisk serve --port 8000")
    assert _problems("scfrisk train --tabel x.csv")
    assert _problems("scfrisk features biuld")
    assert not _problems("SCFRISK_API_KEYS=$KEY scfrisk serve --port 8000")
