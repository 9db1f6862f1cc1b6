"""The README and docs/ as a reader uses them: every link resolves (the file, and the heading an anchor
names), the README's three commands are the ones `.ci/run` and the tests run, and every command the
docs show exists with the flags they give it (`python -m qcore` lines through the real parser)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qcore.cli import build_parser
from qcore.cli.common import UsageError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PLACEHOLDERS = {"NAME": "mnist-net", "W": "4", "A": "4", "B": "4", "N": "4", "PATH": "model.pt", "...": "equalization"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {anchor(heading) for heading in headings}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [first or second for first, second in LINK.findall(text)]


def test_the_anchor_rule_by_hand():
    assert anchor("Zoo results (`python bench/bench_zoo.py --skip-qat`, one run)") == (
        "zoo-results-python-benchbench_zoopy---skip-qat-one-run"
    )
    assert anchor("The quantizer, precisely") == "the-quantizer-precisely"


def test_the_front_door_is_short_and_has_its_picture():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pictures = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", readme)
    assert pictures and all((ROOT / picture).is_file() and picture.endswith(".png") for picture in pictures)
    assert all((ROOT / picture).stat().st_size < 200_000 for picture in pictures)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_resolves(page):
    checked = 0
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s) and mailto: outside the repository, not fetched
            continue
        path_text, _, fragment = target.partition("#")
        path = (page.parent / path_text).resolve() if path_text else page
        assert path.exists(), f"{page.name}: {target} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: {target} leaves the repository"
        if fragment:
            assert path.suffix == ".md", f"{page.name}: {target} names an anchor in a non-markdown file"
            assert fragment in anchors(path), f"{page.name}: {target}: no such heading in {path.name}"
        checked += 1
    if page.name == "README.md":
        assert checked >= 15  # the tour and the docs table link every page


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert {page.resolve() for page in PAGES[1:]} <= linked


def fenced_commands(text: str) -> list[str]:
    """Shell commands in ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_the_readmes_commands_are_what_ci_and_the_tests_run():
    assert fenced_commands((ROOT / "README.md").read_text()) == [
        "bash .ci/setup",
        "streamlit run app.py",
        "python -m pytest",
    ]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash .ci/setup" in ci and "python -m pytest" in ci
    serving = (ROOT / "tests" / "serving.py").read_text()
    assert re.search(r'"streamlit",\s*"run",\s*"app.py"', serving)  # the server the browser tests start


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        candidates = fenced_commands(text) + CODE_SPAN.findall(FENCE.sub("", text))
        for command in candidates:
            match = re.search(r"(?:^|\s)((?:python -m qcore|python \S+\.py|bash \S+)(?: .*)?)$", command)
            if match:
                found.append((page.name, match.group(1)))
    return found


def test_the_docs_show_many_commands():
    assert len({command for _, command in documented_commands()}) >= 40


@pytest.mark.parametrize("where, command", documented_commands())
def test_every_documented_command_exists_with_its_flags(where, command):
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "qcore"]:
        # placeholders (NAME, W, [--flag ...]) stand for a value a reader picks: take a valid one
        arguments = [PLACEHOLDERS.get(word.strip("[]"), word.strip("[]")) for word in words[3:] if word.strip("[]")]
        if words[3:] in ([], ["..."]) or arguments[0] in ("--help", "-h"):  # `python -m qcore ...` in prose
            return
        parser = build_parser()
        commands = next(action for action in parser._actions if action.dest == "command").choices
        assert arguments[0] in commands, f"{where}: `{command}`: no command {arguments[0]}"
        if len(arguments) == 1:  # the command named in prose; its required flags come later
            return
        try:
            parser.parse_args(arguments)
        except UsageError as error:
            pytest.fail(f"{where}: `{command}`: {error}")
        return
    script = ROOT / words[1]
    assert script.is_file(), f"{where}: `{command}`: {words[1]} does not exist"
    source = script.read_text()
    for flag in (word.strip("[]").split("=")[0] for word in words[2:] if word.strip("[]").startswith("--")):
        assert f'"{flag}"' in source, f"{where}: `{command}`: {words[1]} has no flag {flag}"
