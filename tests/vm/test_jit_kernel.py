"""Just in time on kernel WireGuard: both install modes and a revocation, in one quick
VM. The cases run inside it through tests/vm/jit_kernel_inner.py (a namespace lab
built in the guest with kernel interfaces; the daemon on `--backend netlink`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from lab.vm import VM

pytestmark = pytest.mark.vm

INNER = "tests/vm/jit_kernel_inner.py"
EXPECTED = {
    "test_reinjection_answers_the_clients_first_initiation[c1]",
    "test_reinjection_answers_the_clients_first_initiation[c3]",
    "test_role_inversion_has_the_gateway_initiate_before_the_clients_retry",
    "test_a_revoked_peer_is_removed_from_the_kernel",
}


def test_jit_on_kernel_wireguard(tmp_path):
    # Two guest CPUs: the daemon, the registry and the clients' pings share them.
    with VM(cpus=2, memory_mb=1536, log_dir=tmp_path) as vm:
        report = vm.shared_dir / "junit.xml"
        result = vm.run([".venv/bin/python", "-m", "pytest", INNER, "-q", "-rA", "-s",
                         "-p", "no:cacheprovider", f"--junitxml={report}"], timeout=900)
        print(result.output)
        assert result.returncode == 0, result.output[-6000:]
        cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    assert set(cases) == EXPECTED, set(cases) ^ EXPECTED
    for name, case in cases.items():
        assert not list(case), f"{name} did not pass: {ET.tostring(case, 'unicode')[:2000]}"
