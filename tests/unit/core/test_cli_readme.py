"""README.md's command lines use only flags the parsers have, and its CLI reference lists every flag."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from fewshot_proto import evaluate, predict, train
from fewshot_proto.episodes import __main__ as episodes

ROOT = Path(__file__).resolve().parents[3]
MODULES = {"train": train, "evaluate": evaluate, "predict": predict, "episodes": episodes}
COMMAND = re.compile(r"(?:python\S*\s+-m\s+fewshot_proto\.|(?<![\w-])fewshot-)(train|evaluate|predict|episodes)\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def readme() -> str:
    return (ROOT / "README.md").read_text()


def flags_of(p: argparse.ArgumentParser) -> Set[str]:
    """Every option string of ``p`` and of its sub-command parsers."""
    out: Set[str] = set()
    for a in p._actions:
        out.update(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out |= flags_of(sp)
    return out


def readme_commands() -> List[Tuple[str, str]]:
    """``(tool, the rest of its command line)`` for every command line in README.md's code blocks (continuation
    lines joined: a trailing backslash, or an indented line under a command in a synopsis)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme(), flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        i = 0
        while i < len(lines):
            for segment in lines[i].split("&&"):
                m = COMMAND.search(segment)
                if not m:
                    continue
                rest = segment[m.end():]
                while i + 1 < len(lines) and lines[i + 1][:1].isspace() and not COMMAND.search(lines[i + 1]):
                    i += 1
                    rest += " " + lines[i]
                found.append((m.group(1), rest.split("#")[0].strip()))
            i += 1
    return found


def test_the_readme_has_command_lines_for_every_tool():
    assert {tool for tool, _ in readme_commands()} == set(MODULES)
    assert any(COMMAND.search(f"fewshot-{t}") for t in MODULES)


@pytest.mark.parametrize("tool, line", readme_commands())
def test_readme_command_lines_parse(tool, line):
    parser = MODULES[tool].build_parser()
    if any(c in line for c in "[|") or "..." in line:  # a synopsis: every flag it names exists
        unknown = set(FLAG.findall(line)) - flags_of(parser)
        assert not unknown, f"README: {tool} {line}: no such flag(s) {sorted(unknown)}"
    else:  # a concrete command: the real parser accepts it (nothing is run)
        parser.parse_args(shlex.split(line))


def reference_sections() -> Dict[str, str]:
    """The README's CLI reference table of each tool (from ``**`<tool>`**`` to the next blank-line paragraph)."""
    text = readme().split("## Command line", 1)[1].split("\n## ", 1)[0]
    out = {}
    for tool in MODULES:
        m = re.search(rf"\*\*`{tool}`\*\*[^\n]*\n\n(\|.*?)\n\n", text, flags=re.S)
        assert m, f"README: no reference table for {tool} under '## Command line'"
        out[tool] = m.group(1)
    return out


@pytest.mark.parametrize("tool", MODULES)
def test_every_flag_is_in_the_readme_reference(tool):
    table = reference_sections()[tool]
    missing = sorted(f for f in flags_of(MODULES[tool].build_parser()) - {"-h", "--help", "--version"}
                     if not re.search(rf"`{re.escape(f)}[` ]", table))
    assert not missing, f"README's {tool} reference lacks {missing}"
