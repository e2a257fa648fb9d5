"""docs/plugins.md stays true to the code it quotes: every code block marked
C{<!-- quoted from PATH -->} is, verbatim, in that (tested) file; no Python block is left
unmarked (a block that is not a quote says C{<!-- sketch -->}); every hook of
C{[[plugins]]} has its row in the hooks table; and "Built-in plugins" stays the last section
(other plugins append their line there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailrelay.interfaces import HOOKS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"

QUOTED = re.compile(r"^<!-- quoted from (?P<path>\S+) -->$")


def blocks() -> list[tuple[str, str, str]]:
    """Each fenced block of the guide: (the line before it, its language, its code)."""
    found: list[tuple[str, str, str]] = []
    lines = DOC.read_text(encoding="utf-8").splitlines(keepends=True)
    before, opened, code = "", None, []
    for line in lines:
        if opened is None and line.startswith("```"):
            opened, code = line[3:].strip(), []
        elif opened is not None and line.rstrip("\n") == "```":
            found.append((before, opened, "".join(code)))
            opened = None
        elif opened is not None:
            code.append(line)
        else:
            before = line.rstrip("\n")
    assert opened is None, "docs/plugins.md has a code block that is not closed"
    return found


def quotes() -> list[tuple[str, str]]:
    return [
        (m["path"], code) for before, _, code in blocks() if (m := QUOTED.match(before))
    ]


def test_the_guide_quotes_code() -> None:
    found = quotes()
    assert len(found) >= 15
    assert {path for path, _ in found} >= {
        "examples/site-hooks/sitehooks.py",
        "examples/site-hooks/twisted/plugins/sitehooks_plugin.py",
        "examples/sqlite-recipients/sqlite_recipients.py",
        "examples/lmtp-domains/lmtp_domains.py",
        "examples/http-webhook/http_webhook.py",
        "tests/test_example_sitehooks.py",
    }


@pytest.mark.parametrize(("path", "code"), quotes(), ids=lambda value: str(value)[:40])
def test_each_quote_is_verbatim_in_its_file(path: str, code: str) -> None:
    assert path.startswith(("examples/", "tests/")), f"{path}: quote tested files only"
    source = (ROOT / path).read_text(encoding="utf-8")
    assert code in source, f"docs/plugins.md quotes {path}, which no longer has:\n{code}"


def test_no_python_block_is_unmarked() -> None:
    for before, lang, code in blocks():
        if lang == "python":
            assert QUOTED.match(before) or before == "<!-- sketch -->", (
                "a Python block of docs/plugins.md is neither a quote of a tested file "
                f"(<!-- quoted from PATH -->) nor marked <!-- sketch -->:\n{code[:200]}"
            )


def test_every_hook_has_its_row() -> None:
    text = DOC.read_text(encoding="utf-8")
    for hook in HOOKS:
        row = f"| `{hook.name}` | `{hook.interface.__name__}"
        assert row in text, f"the hooks table of docs/plugins.md has no row {row!r}"


def test_built_in_plugins_is_the_last_section() -> None:
    sections = re.findall(r"^## (.+)$", DOC.read_text(encoding="utf-8"), re.M)
    assert sections[-1] == "Built-in plugins"
