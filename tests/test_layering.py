"""The import rule of the package layout, checked on the source (AST, no import).

Layers, lowest first: the values (C{interfaces}, C{envelope}, C{errors}, C{address},
C{metrics}, C{namedfile}, C{headers}, C{endpoints}, C{pem}, C{lograte}, and C{config.schema}/C{config.values} once they exist); C{smtp/}, the sans-IO
protocol engines;
the stages (C{receive}, C{policy}, C{cleanup}, C{spool}, C{queue}, C{route}, C{delivery});
C{config/}; C{testing/}; C{app/}, the composition roots (and C{mailrelay.__main__}, which
runs one).  A module may import its own
package, the values, and:

  - C{smtp/}: nothing else, and no C{twisted} or C{OpenSSL};
  - a stage: C{smtp/}, and C{receive} also C{policy}, C{delivery} also C{route};
  - C{config/}: C{smtp/} and the stages;
  - C{testing/}: everything but C{app/}; C{app/}: everything but C{testing/};
  - the dropin (C{twisted/plugins/mailrelay_plugin.py}) and C{builtin/} (the built-in
    plugins, written on the public API as a site's would be): the values only.

Nobody imports C{app/} or C{testing/} from outside, nor an old module path kept as an alias
(a shim).  A package's C{__init__.py} holds only a docstring, imports and C{__all__}.

Every import counts: at the top, inside functions (lazy) and under C{TYPE_CHECKING}.
L{KNOWN} lists the violations still there; the test fails on any other, and warns about a
C{KNOWN} entry that is gone, so that it can be struck out (the list only shrinks).
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

VALUES = {
    "mailrelay",  # the version only
    "mailrelay.interfaces",
    "mailrelay.envelope",
    "mailrelay.errors",
    "mailrelay.address",
    "mailrelay.metrics",
    "mailrelay.namedfile",
    "mailrelay.headers",
    "mailrelay.endpoints",
    "mailrelay.pem",
    "mailrelay.lograte",
    "mailrelay.config.schema",
    "mailrelay.config.values",
}
STAGES = {"receive", "policy", "cleanup", "spool", "queue", "route", "delivery"}
#: Stage -> the other stages it may import.
STAGE_EXTRA = {"receive": {"policy"}, "delivery": {"route"}}
#: Old module paths kept for good (public: docs/plugins.md, the README, stale dropin.cache files
#: name them), each an alias of the moved module (see each file's docstring) but L{REEXPORTS}.
SHIMS = {
    "mailrelay.auth": "mailrelay.receive.auth",
    "mailrelay.limits": "mailrelay.receive.limits",
    "mailrelay.passwd": "mailrelay.app.passwd",
    "mailrelay.plugins": "mailrelay.app.plugins",
    "mailrelay.stamping": "mailrelay.cleanup.stamping",
    "mailrelay.tap": "mailrelay.app.tap",
    "mailrelay.validators": "mailrelay.policy.validators",
}
#: Old paths that re-export the moved module's names instead of being it:
#: mailrelay.validators also serves the validators' plugin objects, which are the dropin's.
REEXPORTS = {"mailrelay.validators"}
DROPIN = "twisted.plugins.mailrelay_plugin"
#: C{python -m mailrelay}: a composition root, like the modules of C{app/}.
MAIN = "mailrelay.__main__"

#: The violations left after the move (issue 8, step 1).  Strike an entry out when its cause
#: is gone; never add one.
KNOWN: set[str] = set()


@dataclass(frozen=True)
class Source:
    """One module of the tree: its dotted name, whether it is a package, its syntax tree."""

    name: str
    isPackage: bool
    tree: ast.Module


def readTree(root: Path) -> dict[str, Source]:
    """Every module under C{root/mailrelay}, and the dropin when there is one."""
    found: dict[str, Source] = {}
    paths = sorted((root / "mailrelay").rglob("*.py"))
    dropin = root / "twisted" / "plugins" / "mailrelay_plugin.py"
    if dropin.exists():
        paths.append(dropin)
    for path in paths:
        parts = list(path.relative_to(root).with_suffix("").parts)
        isPackage = parts[-1] == "__init__"
        if isPackage:
            parts.pop()
        name = ".".join(parts)
        found[name] = Source(name, isPackage, ast.parse(path.read_text(), str(path)))
    return found


def importsOf(source: Source, modules: set[str]) -> set[str]:
    """The modules C{source} imports anywhere in its text: C{from p import m} names module
    C{p.m} when that is a module of the tree, C{p} otherwise."""
    targets: set[str] = set()
    package = source.name if source.isPackage else source.name.rpartition(".")[0]
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in modules else base)
    return targets


def unitOf(name: str) -> str:
    """The layer unit of a module: C{values}, C{smtp}, a stage, C{config}, C{testing},
    C{app}, C{builtin}, C{dropin}, C{shim}, or C{other} (outside mailrelay)."""
    if name in SHIMS:
        return "shim"
    if name in VALUES:
        return "values"
    if name == DROPIN:
        return "dropin"
    if name == MAIN:
        return "app"
    parts = name.split(".")
    if parts[0] != "mailrelay" or len(parts) < 2:
        return "other"
    if parts[1] in STAGES or parts[1] in {"smtp", "config", "testing", "app", "builtin"}:
        return parts[1]
    return "other"


def allowed(source: str, target: str) -> bool:
    """Whether module C{source} may import module C{target}."""
    src, dst = unitOf(source), unitOf(target)
    if src == "shim":
        return True  # an alias imports what it stands for
    if src == "smtp" and target.split(".")[0] in {"twisted", "OpenSSL"}:
        return False
    if dst == "other":
        return True  # the standard library, Twisted, ...
    if dst == "shim" or (dst == "testing" and src != "testing"):
        return False
    if dst == "values" or src == dst:
        return True
    if src == "app":
        return True
    if src == "testing":
        return dst != "app"
    if src == "config":
        return dst == "smtp" or dst in STAGES
    if src in STAGES:
        return dst == "smtp" or dst in STAGE_EXTRA.get(src, set())
    return False  # values, smtp and the dropin import nothing more


def initProblem(source: Source) -> str | None:
    """Why a package's C{__init__.py} holds more than a docstring, imports and C{__all__}."""
    if not source.isPackage:
        return None
    body = source.tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__")
            for t in node.targets
        ):
            continue  # __all__, __version__
        return f"{source.name}: __init__.py holds code"
    return None


def violations(root: Path) -> set[str]:
    """Every violation of the import rule in the tree at C{root}."""
    tree = readTree(root)
    modules = set(tree)
    found: set[str] = set()
    for name, source in tree.items():
        if unitOf(name) == "shim":
            continue
        for target in importsOf(source, modules):
            if not allowed(name, target):
                shown = target
                if target.split(".")[0] == "twisted":
                    shown = ".".join(target.split(".")[:2])  # twisted.internet, not each module
                found.add(f"{name} -> {shown}")
        problem = initProblem(source)
        if problem:
            found.add(problem)
    return found


def test_importRule() -> None:
    """No import breaks the layering but those listed in L{KNOWN}."""
    found = violations(ROOT)
    stale = sorted(KNOWN - found)
    if stale:
        warnings.warn(
            f"test_layering.KNOWN lists violations that are gone, strike them out: {stale}",
            stacklevel=1,
        )
    assert sorted(found - KNOWN) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_ruleFindsEachKindOfViolation(tmp_path: Path) -> None:
    """The checker itself: each rule is seen, lazy and TYPE_CHECKING imports included."""
    chain = "import typing\nif typing.TYPE_CHECKING:\n    from mailrelay.receive.auth import x\n"
    root = write(tmp_path, {
        "mailrelay/__init__.py": '"""Doc."""\n__version__ = "1"\n',
        "mailrelay/interfaces.py": "def f():\n    from mailrelay.app import relay\n",
        "mailrelay/address.py": "from mailrelay.smtp import replies\n",
        "mailrelay/errors.py": "",
        "mailrelay/auth.py": "import sys\nfrom mailrelay.receive import auth\n",
        "mailrelay/smtp/__init__.py": '"""Doc."""\n',
        "mailrelay/smtp/replies.py": "from twisted.internet import defer\nimport OpenSSL\n",
        "mailrelay/receive/__init__.py": '"""Doc."""\nfrom . import auth\n__all__ = ["auth"]\n',
        "mailrelay/receive/auth.py": "from mailrelay.policy import chain\nfrom . import tls\n",
        "mailrelay/receive/tls.py": "from mailrelay.auth import x\n",
        "mailrelay/policy/__init__.py": "",
        "mailrelay/policy/chain.py": chain,
        "mailrelay/queue/__init__.py": "x = 1\n",
        "mailrelay/queue/dsn.py": "from mailrelay.spool import y\nimport mailrelay.testing\n",
        "mailrelay/spool/__init__.py": "",
        "mailrelay/delivery/smtp.py": "from mailrelay.route.table import t\n",
        "mailrelay/route/table.py": "",
        "mailrelay/config/__init__.py": "from mailrelay.receive import tls\nimport mailrelay.app\n",
        "mailrelay/testing/__init__.py": "import mailrelay.queue\nfrom mailrelay import app\n",
        "mailrelay/app/__init__.py": "",
        "mailrelay/app/relay.py": "from mailrelay.testing import h\nimport mailrelay.config\n",
        "twisted/plugins/mailrelay_plugin.py": "from mailrelay.interfaces import I\n"
                                               "from mailrelay.policy import chain\n",
    })
    assert violations(root) == {
        "mailrelay.interfaces -> mailrelay.app.relay",
        "mailrelay.address -> mailrelay.smtp.replies",
        "mailrelay.smtp.replies -> twisted.internet",
        "mailrelay.smtp.replies -> OpenSSL",
        "mailrelay.receive.tls -> mailrelay.auth",
        "mailrelay.policy.chain -> mailrelay.receive.auth",
        "mailrelay.queue: __init__.py holds code",
        "mailrelay.queue.dsn -> mailrelay.spool",
        "mailrelay.queue.dsn -> mailrelay.testing",
        "mailrelay.config -> mailrelay.app",
        "mailrelay.testing -> mailrelay.app",
        "mailrelay.app.relay -> mailrelay.testing",
        "twisted.plugins.mailrelay_plugin -> mailrelay.policy.chain",
    }


@pytest.mark.parametrize("old", sorted(set(SHIMS) - REEXPORTS))
def test_oldPathIsTheMovedModule(old: str) -> None:
    """Each old path is the moved module itself, so that monkeypatching and private names
    reached through it keep working."""
    assert import_module(old) is import_module(SHIMS[old])


@pytest.mark.parametrize("old", sorted(REEXPORTS))
def test_oldPathReexportsTheMovedModule(old: str) -> None:
    """An old path that is not an alias serves every public name of the moved module, the
    same objects."""
    moved = import_module(SHIMS[old])
    module = import_module(old)
    assert moved.__all__ and set(moved.__all__) <= set(module.__all__)
    for name in moved.__all__:
        assert getattr(module, name) is getattr(moved, name), name


def test_shimsAreListed() -> None:
    """Every alias module of the tree is in L{SHIMS}, and the other way round."""
    aliases = {
        name for name, source in readTree(ROOT).items()
        if "sys.modules[__name__]" in ast.unparse(source.tree)
    }
    assert aliases == set(SHIMS) - REEXPORTS
