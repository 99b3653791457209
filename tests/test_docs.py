"""The documentation's commands and links, checked: a documented command that would not run as written fails.

Every shell command in a fenced block of README.md or docs/*.md that runs ``diffrec``, an entry script,
``python bench/...``, ``python examples/...``, ``python -m`` or ``make`` is parsed by the real argument parser (a dry run: nothing
executes), its ``--cfg-path`` config is loaded with its ``--options``, and each path it names exists in the
repository, lies below a folder that an earlier documented command writes (``dataset/``, ``runs/``,
``models/``), or stands in a block marked ``<!-- needs: data -->`` (the published datasets or your own files).
Inline code that runs a bench script or a make target is checked the same way; inline ``diffrec ...``
names a command, so only its subcommands are checked. Every relative link and its anchor must resolve.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import registry_snapshot

from minigpt4.cli import build_parser
from minigpt4.config import load_config
from minigpt4.errors import DiffRecError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRITTEN_ROOTS = ("dataset/", "runs/", "models/", "../runs/")  # folders the documented commands create
ENTRY_SCRIPTS = {"train_collm_mf_din.py": "train", "baseline_train_mf_ood.py": "pretrain"}
PATH_SUFFIXES = (".yaml", ".py", ".pkl", ".gz", ".jsonl", ".json", ".csv", ".npy", ".dat", ".md", ".png", ".txt")
FENCE = re.compile(r"^(?:<!-- needs: (?P<needs>[a-z, ]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    """One documented command: where it stands, its words, and whether it needs data outside the repository."""

    where: str
    words: tuple[str, ...]
    needs_data: bool
    inline: bool = False


def _fenced_commands(page: Path) -> list[Command]:
    """Commands of the page's shell blocks, continuation lines joined, comments dropped."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in FENCE.finditer(text):
        if block["lang"] not in ("bash", "sh", "shell"):
            continue
        first_line = text.count("\n", 0, block.start("body")) + 1
        body = block["body"].replace("\\\n", " ")
        for offset, line in enumerate(body.splitlines()):
            words = shlex.split(line, comments=True)
            if words and _runner(words) is not None:
                where = f"{page.relative_to(ROOT)}:{first_line + offset}"
                commands.append(Command(where, tuple(words), needs_data="data" in (block["needs"] or "")))
    return commands


def _inline_commands(page: Path) -> list[Command]:
    """Inline code spans outside fences that run something."""
    text = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), page.read_text(encoding="utf-8"))
    commands = []
    for span in INLINE.finditer(text):
        try:
            words = shlex.split(span.group(1))
        except ValueError:
            continue
        if words and _runner(words) is not None:
            where = f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, span.start()) + 1}"
            commands.append(Command(where, tuple(words), needs_data=False, inline=True))
    return commands


def _runner(words: list[str] | tuple[str, ...]) -> str | None:
    """Which kind of command ``words`` is (diffrec, an entry script, a bench script, python -m, make), or None."""
    program = words[0].removeprefix(".venv/bin/")
    if program == "diffrec":
        return "diffrec"
    if program == "make" and len(words) > 1:
        return "make"
    if program in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            return "module"
        if words[1] in ENTRY_SCRIPTS:
            return "entry"
        if words[1].startswith(("bench/", "examples/")):
            return "script"
    return None


class _Parsed(Exception):
    """Raised instead of running a script once its arguments parsed."""


def _dry_run_script(path: Path, argv: list[str]) -> None:
    """Run ``path`` as ``__main__`` only up to its ``parse_args``: a usage error raises SystemExit."""
    source = path.read_text(encoding="utf-8")
    if "parse_args" not in source and "from minigpt4.cli import main" not in source:
        assert not argv, f"{path.name} takes no arguments, got {argv}"
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path = [str(path), *argv], [str(path.parent), *sys.path]  # as `python script.py` sets them
    try:
        with registry_snapshot():  # an example registers its model: not for the tests after this one
            runpy.run_path(str(path), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as exit_:
        raise AssertionError(f"{path.name} {' '.join(argv)}: usage error (exit {exit_.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv, sys.path = saved_argv, saved_path
    raise AssertionError(f"{path.name} ran past its argument parsing")


def _paths(words: list[str]) -> list[str]:
    """The words that name files or folders (an option's ``key=path`` value included)."""
    found = []
    for word in words:
        value = word.split("=", 1)[1] if "=" in word else word
        if value.startswith("-") or "://" in value or value in (".", "..."):
            continue
        if "/" in value or value.endswith(PATH_SUFFIXES):
            found.append(value)
    return found


def _check_path(value: str, needs_data: bool, inline: bool) -> None:
    """A named path exists in the repository, is written by a documented command, or needs data."""
    if any(mark in value for mark in ("<", "path/to", "...", "*")) or value.startswith(WRITTEN_ROOTS):
        return
    if needs_data or inline:
        return
    path = (ROOT / value).resolve()
    assert path.is_relative_to(ROOT) and path.exists(), (
        f"{value} is not in the repository (mark the block <!-- needs: data --> if it is data)"
    )


def check_command(command: Command) -> None:
    """Parse ``command`` as its program would and check what it names; AssertionError says what is wrong."""
    words = list(command.words)
    kind = _runner(words)
    if kind == "make":
        makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make has no target {target!r}"
        return
    if kind == "module":
        module = words[2]
        if module == "pytest":
            for value in _paths(words[3:]):
                _check_path(value.split("::")[0], command.needs_data, command.inline)
            return
        if module == "pip":  # installs from an index: nothing in the repository to check
            return
        assert module.startswith("minigpt4"), f"python -m {module}: not a module of this project"
        words = ["diffrec", *words[3:]] if module == "minigpt4.cli" else words
        if module != "minigpt4.cli":
            __import__(module)
            return
    if kind == "script":
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        if command.inline and "..." in words:  # an abbreviated reference: the fenced command gives it whole
            return
        _dry_run_script(script, words[2:])
        for value in _paths(words[2:]):
            _check_path(value, command.needs_data, command.inline)
        return
    argv = [ENTRY_SCRIPTS[words[1]], *words[2:]] if kind == "entry" else words[1:]
    argv = [word.replace("--cfg-path=", "--cfg-path ", 1) for word in argv]
    argv = [part for word in argv for part in (word.split(" ", 1) if word.startswith("--cfg-path ") else [word])]
    if command.inline:  # inline `diffrec x y` names a command: check the subcommand chain only
        argv = [word for word in argv if not word.startswith("-") and "/" not in word and word != "..."][:2]
        _check_subcommands(argv)
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"diffrec {' '.join(argv)}: usage error (exit {exit_.code})") from None
    cfg_path = getattr(args, "cfg_path", None)
    if cfg_path is not None:
        assert (ROOT / cfg_path).is_file(), f"config {cfg_path} does not exist"
        try:
            load_config(ROOT / cfg_path, args.options)
        except DiffRecError as err:
            raise AssertionError(f"config or --options rejected: {err}") from None
    for value in _paths(argv):
        _check_path(value, command.needs_data, command.inline)


def _check_subcommands(names: list[str]) -> None:
    """``names`` is a chain of diffrec subcommands (the first must exist; the second where it has children)."""
    parser = build_parser()
    for name in names:
        choices = next(
            (action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)), None
        )
        if choices is None:
            return
        assert name in choices, f"diffrec has no subcommand {name!r} here (choices: {', '.join(choices)})"
        parser = choices[name]


COMMANDS = [command for page in PAGES for command in (*_fenced_commands(page), *_inline_commands(page))]


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where for command in COMMANDS])
def test_documented_command_runs_as_written(command: Command) -> None:
    """Each documented command parses, its config and options load, its paths exist or are marked."""
    check_command(command)


def test_commands_are_found() -> None:
    """The extraction sees the README's two commands and the bench scripts' (a broken regex checks nothing)."""
    wheres = {command.words for command in COMMANDS}
    assert ("make", "demo") in wheres and ("make", "test") in wheres
    assert sum(_runner(command.words) == "script" for command in COMMANDS) >= 3
    assert len(COMMANDS) >= 50


@pytest.mark.parametrize(
    "words, problem",
    [
        (("diffrec", "recommend", "--cfg-path", "train_configs/demo_ml100k.yaml", "--usr", "5"), "usage error"),
        (("diffrec", "pretrain", "--cfg-path", "train_configs/mf_ml100k.yaml", "--options", "run.lrr=1"), "run.lrr"),
        (("diffrec", "train", "--cfg-path", "train_configs/nothing.yaml"), "does not exist"),
        (("python", "bench/reranking.py"), "usage error"),
        (("python", "bench/serving.py", "--no-such-flag"), "usage error"),
        (("make", "tests"), "no target"),
        (("diffrec", "data", "import-collm", "somewhere/collm"), "not in the repository"),
    ],
)
def test_a_broken_command_fails(words: tuple[str, ...], problem: str) -> None:
    """The checker fails on a renamed option, an unknown key, a missing file, missing arguments, a missing target."""
    with pytest.raises(AssertionError, match=problem):
        check_command(Command("here", words, needs_data=False))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks), numbered as GitHub numbers repeats."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


LINKS = [
    (page, target)
    for page in PAGES
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))
    if not target.startswith(("http://", "https://", "mailto:"))
]


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page: Path, target: str) -> None:
    """A relative link names an existing file, and its #anchor a heading of that file."""
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{target}: no such file"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{target}: no heading with anchor #{anchor} in {resolved.name}"


def test_readme_front_door() -> None:
    """README under 15 KB, its Layout names only paths that exist, and the LICENSE is the licence pyproject declares."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 15_000
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    for line in layout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.endswith(("/", ".py")):  # continuation lines and the `tests/, bench/, .ci/run` line
            continue
        base = ROOT / "minigpt4" if line.startswith("  ") else ROOT
        assert (base / name).exists(), f"README's Layout names {name}, which does not exist"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert license_text.startswith("BSD 3-Clause License") and 'license = { text = "BSD-3-Clause" }' in pyproject
