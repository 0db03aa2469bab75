"""The pure core imports no I/O or concurrency library, directly or through another actors
module, so its rules can be tested and reused with plain sync calls.

Pure means: every module of ``actors/core/`` (found on disk, so a new one is checked without
being listed), and the data plane's decision modules (routing policies, the prefix cache, the
circuit breakers), which hold state but do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "actors" / "core"
PURE_DATAPLANE = [
    "actors/dataplane/routing.py",
    "actors/dataplane/prefix_cache.py",
    "actors/dataplane/breaker.py",
    "actors/dataplane/requests.py",
]
FORBIDDEN = {"trio", "httpx", "quart", "quart_trio", "hypercorn", "anyio", "outcome"}


def pure_modules() -> list[str]:
    core = sorted(str(path.relative_to(ROOT)) for path in CORE.glob("*.py"))
    return core + PURE_DATAPLANE


def imported_modules(source: str, package: str = "actors.core") -> set[str]:
    """Every module an import statement names: ``import a.b`` gives ``a.b``; ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a submodule). Relative imports are resolved against
    ``package`` (the importing module's package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def forbidden_in(names: set[str]) -> set[str]:
    return {name for name in names if name.split(".")[0] in FORBIDDEN}


def actors_dependencies(names: set[str]) -> set[str]:
    """The actors module files among ``names`` (as paths from the project root); the package
    ``__init__`` files (the library's facade opens the gateway) are not dependencies of a rule."""
    files = set()
    for name in names:
        if name.split(".")[0] != "actors":
            continue
        path = ROOT / (name.replace(".", "/") + ".py")
        if path.is_file():
            files.add(str(path.relative_to(ROOT)))
    return files


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import trio", {"trio"}),
        ("import trio.lowlevel as tl", {"trio.lowlevel"}),
        ("from trio import sleep", {"trio", "trio.sleep"}),
        ("from httpx._client import AsyncClient", {"httpx._client", "httpx._client.AsyncClient"}),
        ("import os, anyio", {"anyio"}),
        ("if True:\n    from outcome import Value", {"outcome", "outcome.Value"}),
        ("def f():\n    import hypercorn.trio", {"hypercorn.trio"}),
        ("import quart_trio", {"quart_trio"}),
        ("import triolet, trio_ish, os, json", set()),
    ],
)
def test_the_checker_finds_every_spelling_of_a_forbidden_import(
    source: str, expected: set[str]
) -> None:
    assert forbidden_in(imported_modules(source)) == expected


def test_the_checker_follows_actors_imports_in_every_spelling() -> None:
    source = (
        "from actors.core import model\nfrom actors.core.urls import X\n"
        "from . import errors\nfrom ..dataplane import breaker\nimport actors"
    )

    assert actors_dependencies(imported_modules(source)) == {
        "actors/core/model.py",
        "actors/core/urls.py",
        "actors/core/errors.py",
        "actors/dataplane/breaker.py",
    }


def test_the_core_holds_the_registry_rules() -> None:
    names = {Path(path).name for path in pure_modules()}
    assert {"model.py", "table.py", "commands.py", "validation.py", "config.py"} <= names


@pytest.mark.parametrize("path", pure_modules())
def test_a_pure_module_imports_no_io_or_concurrency_library(path: str) -> None:
    names = imported_modules((ROOT / path).read_text(), _package(path))

    assert forbidden_in(names) == set()


@pytest.mark.parametrize("path", pure_modules())
def test_the_actors_modules_a_pure_module_imports_are_pure_too(path: str) -> None:
    chains = {path: [path]}  # module -> the import chain that reaches it
    todo = [path]
    while todo:
        current = todo.pop()
        names = imported_modules((ROOT / current).read_text(), _package(current))
        chain = " -> ".join(chains[current])
        assert forbidden_in(names) == set(), f"{chain} imports {sorted(forbidden_in(names))}"
        for dependency in sorted(actors_dependencies(names) - chains.keys()):
            chains[dependency] = [*chains[current], dependency]
            todo.append(dependency)


def _package(path: str) -> str:
    return ".".join(Path(path).parent.parts)
