"""Fixtures for end-to-end suites: labs of namespaces with real wireguard-go.

    lab_factory   module-scoped: make(gateways=["jit"], clients=3, ...) -> Lab; every lab
                  it made is destroyed when the module ends.
    session_lab_factory   the same, destroyed when the session ends.
    lab           module-scoped: one lab built from the module's LAB_SPEC dict (LabSpec
                  fields), or from indirect parametrization; default one plain gateway,
                  one client, the registry when it is available.

Cleanup runs when a test fails, on Ctrl-C (pytest runs finalizers on
KeyboardInterrupt) and on SIGTERM/SIGHUP (turned into KeyboardInterrupt for the
session); if the process dies outright, the next session (or `python -m lab down
--all`) removes labs whose owner is gone, and an atexit hook covers other exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.topology import Lab, LabSpec, reap_orphans, signals_raise_interrupt


@pytest.fixture(scope="session", autouse=True)
def _lab_session_guard() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespaces)")
    reap_orphans()
    with signals_raise_interrupt():
        yield


def _factory() -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(**spec: Any) -> Lab:
        lab = Lab.up(LabSpec(**spec))
        labs.append(lab)
        return lab

    yield make
    problems = []
    for lab in reversed(labs):
        problems += lab.down()
    assert not problems, f"lab teardown: {problems}"


@pytest.fixture(scope="module")
def lab_factory() -> Iterator[Callable[..., Lab]]:
    yield from _factory()


@pytest.fixture(scope="session")
def session_lab_factory() -> Iterator[Callable[..., Lab]]:
    """Like lab_factory, for labs shared by several modules."""
    yield from _factory()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, lab_factory: Callable[..., Lab]) -> Lab:
    spec = getattr(request, "param", None) or getattr(request.module, "LAB_SPEC", None) or {}
    return lab_factory(**spec)
