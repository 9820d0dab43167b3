"""The documentation's promises that a script can check: the README stays a front page (short, no
commit hashes or dates: those live in EXPERIMENTS.md and BENCHMARKS.md rows), every relative link in
README.md and docs/*.md resolves to a file, and every command in the README's code blocks names a
script, module or make target that exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 150

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMIT_HASH = re.compile(r"\b[0-9a-f]{7,40}\b")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXTERNAL_MODULES = {"pip", "pytest", "venv"}  # `python -m` modules that are not ours


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text a reader sees as prose: fenced code blocks and inline code removed (a `[--opt](...)`
    inside code is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Targets of markdown links and images, http(s)/mailto links and pure #anchors left out, any
    #anchor stripped."""
    targets = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^(https?|mailto):", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8") if text is None else text
    return [t for t in relative_links(text) if not (path.parent / t).exists()]


def code_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def command_lines(text: str) -> list[str]:
    """Every `python` / `bash` / `make` command in the fenced code blocks, continuation lines joined,
    comments and leading VAR=value assignments dropped."""
    commands = []
    for block in code_blocks(text):
        body = "\n".join(block.splitlines()[1:-1]).replace("\\\n", " ")
        for line in body.splitlines():
            line = re.split(r"\s#", " " + line, maxsplit=1)[0].strip()
            words = line.split()
            while words and ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and words[0] in ("python", "python3", "bash", "make"):
                commands.append(" ".join(words))
    return commands


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


def missing_entry_point(command: str) -> str | None:
    """What the command names that does not exist in the repository, or None."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    if program == "make":
        targets = makefile_targets()
        wanted = [a for a in args if not a.startswith("-") and "=" not in a] or ["(default)"]
        missing = [t for t in wanted if t not in targets]
        return f"make target {missing[0]}" if missing else None
    if not args:
        return f"{program} without a script"
    if program == "bash":
        return None if (ROOT / args[0]).is_file() else args[0]
    if args[0] == "-m":
        module = args[1]
        if module.split(".")[0] in EXTERNAL_MODULES:
            return None
        base = ROOT / module.replace(".", "/")
        return None if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() else f"module {module}"
    return None if (ROOT / args[0]).is_file() else args[0]


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_has_no_commit_hash_or_date():
    text = README.read_text(encoding="utf-8")
    hashes = [h for h in COMMIT_HASH.findall(text) if re.search(r"\d", h)]  # "defaced" is a word
    assert hashes == [], f"commit hashes belong in EXPERIMENTS.md / BENCHMARKS.md rows: {hashes}"
    assert DATE.findall(text) == [], "dates belong in EXPERIMENTS.md / BENCHMARKS.md rows"


def test_readme_commands_name_existing_entry_points():
    commands = command_lines(README.read_text(encoding="utf-8"))
    assert any(c.startswith("make demo") for c in commands) and any(c.startswith("make test") for c in commands)
    assert any(c.startswith("python uda/adapt.py") for c in commands)
    missing = {c: m for c in commands if (m := missing_entry_point(c))}
    assert missing == {}


# The checks themselves, on planted faults: a check that cannot fail proves nothing.

def test_a_planted_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    text = ("[ok](there.md#a) ![img](there.md) [web](https://example.org/x) [anchor](#top) "
            "`[code](nowhere.md)` [broken](docs/nowhere.md) ![gone](missing.png)\n"
            "```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page, text) == ["docs/nowhere.md", "missing.png"]


def test_planted_hashes_and_dates_are_found():
    assert COMMIT_HASH.findall("at commit 752af85, then a12e0c3f") == ["752af85", "a12e0c3f"]
    assert DATE.findall("measured 2026-12-01") == ["2026-12-01"]
    assert COMMIT_HASH.findall("12,936 images, a defaced mAP") == ["defaced"]  # filtered by the digit rule


def test_planted_commands_are_checked():
    text = ("```bash\nUDA_DATA=data python uda/pretrain.py --config x \\\n    --source market   # comment\n"
            "python -m uda.extract --help\npython -m uda.nowhere\nbash scripts/nowhere.sh --variant cpu\n"
            "make demo\nmake nowhere\n```\n")
    commands = command_lines(text)
    assert commands[0] == "python uda/pretrain.py --config x --source market"
    assert [missing_entry_point(c) for c in commands] == [
        None, None, "module uda.nowhere", "scripts/nowhere.sh", None, "make target nowhere"]
