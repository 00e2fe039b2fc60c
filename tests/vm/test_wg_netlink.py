"""The netlink backend against the kernel's WireGuard, in one quick VM for the module:
the shared cases (tests/wgcases.py) run inside it through tests/vm/wg_netlink_inner.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from lab.vm import VM
from tests import wgcases

pytestmark = pytest.mark.vm

INNER = "tests/vm/wg_netlink_inner.py"


@pytest.fixture(scope="module")
def vm():
    with VM(echo=False) as machine:
        yield machine


def test_netlink_backend_cases_in_vm(vm):
    report = vm.shared_dir / "junit.xml"
    result = vm.run([".venv/bin/python", "-m", "pytest", INNER, "-q", "-rA", "--durations=0",
                     "-p", "no:cacheprovider", f"--junitxml={report}"], timeout=540)
    print(result.output)
    assert result.returncode == 0, result.output
    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    expected = {f"test_netlink[{c.__name__[5:]}]" for c in wgcases.ALL_CASES}
    expected.add("test_dump_really_splits_peers_across_messages")
    assert set(cases) == expected, set(cases) ^ expected
    for name, case in cases.items():
        assert not list(case), f"{name} did not pass: {ET.tostring(case, 'unicode')[:2000]}"
