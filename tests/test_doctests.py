"""The examples in the docstrings of ``edge`` and ``trainer`` run and print what they say.

Every module of both packages is imported and its doctests run (those
marked ``+SKIP`` need a peer, a GPU or a trained checkpoint). A docstring
example that drifts from the code fails here, not in a reader's shell.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import edge
import trainer


def _modules() -> list[str]:
    names = []
    for package in (edge, trainer):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_walk_finds_the_packages() -> None:
    assert "edge.inference.manifest" in MODULES and "trainer.export" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run pytest --doctest-modules on it)"
