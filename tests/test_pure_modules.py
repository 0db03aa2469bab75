"""The pure core (values, URLs, errors, commands, the table and its indexes, snapshots, config)
imports no I/O or concurrency library, directly or through another actors module, so its rules
can be tested and reused with plain sync calls."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ACTORS = Path(__file__).resolve().parent.parent / "actors"
PURE = [
    "model.py",
    "urls.py",
    "errors.py",
    "commands.py",
    "table.py",
    "indexes.py",
    "codec.py",
    "snapshot.py",
    "config.py",
    "routing.py",
    "prefix_cache.py",
    "breaker.py",
    "jobs.py",
    "persistence.py",
    "validation.py",
    "addresses.py",
]
OPTIONAL_PURE: list[str] = []  # modules checked once they exist
FORBIDDEN = {"trio", "httpx", "quart", "quart_trio", "hypercorn", "anyio", "outcome"}


def imported_modules(source: str) -> set[str]:
    """Every module an import statement names: ``import a.b`` gives ``a.b``; ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a submodule). Relative imports are resolved against
    ``actors``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "actors" + (f".{base}" if base else "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def forbidden_in(names: set[str]) -> set[str]:
    return {name for name in names if name.split(".")[0] in FORBIDDEN}


def actors_dependencies(names: set[str]) -> set[str]:
    """The actors modules (files) among ``names``; the package ``__init__`` (the library's
    public face, which opens the gateway) is not a dependency of its modules' rules."""
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "actors" and len(parts) >= 2 and (ACTORS / f"{parts[1]}.py").exists():
            files.add(f"{parts[1]}.py")
    return files


def pure_modules() -> list[str]:
    return PURE + [name for name in OPTIONAL_PURE if (ACTORS / name).exists()]


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
        "from actors import model\nfrom actors.urls import X\nfrom . import errors\nimport actors"
    )

    assert actors_dependencies(imported_modules(source)) == {"model.py", "urls.py", "errors.py"}


@pytest.mark.parametrize("name", PURE)
def test_each_pure_module_exists(name: str) -> None:
    assert (ACTORS / name).is_file()


@pytest.mark.parametrize("name", pure_modules())
def test_a_pure_module_imports_no_io_or_concurrency_library(name: str) -> None:
    names = imported_modules((ACTORS / name).read_text())

    assert forbidden_in(names) == set()


@pytest.mark.parametrize("name", pure_modules())
def test_the_actors_modules_a_pure_module_imports_are_pure_too(name: str) -> None:
    path = {name: [name]}  # module -> the import chain that reaches it
    todo = [name]
    while todo:
        current = todo.pop()
        names = imported_modules((ACTORS / current).read_text())
        chain = " -> ".join(path[current])
        assert forbidden_in(names) == set(), f"{chain} imports {sorted(forbidden_in(names))}"
        for dependency in sorted(actors_dependencies(names) - path.keys()):
            path[dependency] = [*path[current], dependency]
            todo.append(dependency)
