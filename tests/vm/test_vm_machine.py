"""What the VM tiers need from this machine: a kernel with WireGuard, ruby and vagrant.

Machine checks, not unit tests: they depend on what is installed here (/boot,
/lib/modules, the ruby and vagrant binaries), so they run with the VM tiers.
"""

from __future__ import annotations

import pytest

from lab.vm import image as vm_image

pytestmark = pytest.mark.vm


def test_a_kernel_with_wireguard_is_found_on_this_machine():
    k = vm_image.find_disk_kernel()
    assert k.image.is_file()
    assert vm_image.module_files(k.version, ["wireguard"])
