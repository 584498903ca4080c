"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core_harness import Harness, MakeHarness


@pytest.fixture
def make(tmp_path: Path) -> Iterator[MakeHarness]:
    """Harnesses on ``tmp_path`` (``Harness`` arguments after the directory), closed after the test."""
    made: list[Harness] = []

    def build(*args: Any, **kwargs: Any) -> Harness:
        made.append(Harness(tmp_path, *args, **kwargs))
        return made[-1]

    yield build
    for harness in made:
        harness.close()
