"""Which drivers a VM's initramfs loads, read off each kernel's own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.vm import kernel as vm_kernel
from lab.vm.kernel import Kernel, VMImageError

NEEDED = {"virtio_pci": "the PCI transport", "virtio_console": "the control port",
          "9p": "the host root"}


def _kernel(tmp_path: Path, version: str, *, builtin: list[str], modules: list[str],
            config: dict[str, str]) -> Kernel:
    boot, mods = tmp_path / "boot", tmp_path / "modules" / version
    boot.mkdir(exist_ok=True)
    mods.mkdir(parents=True)
    (boot / f"vmlinuz-{version}").write_bytes(b"")
    (boot / f"config-{version}").write_text(
        "# comment\n" + "".join(f"{k}={v}\n" for k, v in config.items())
        + "# CONFIG_VIRTIO_FS is not set\n")
    (mods / "modules.builtin").write_text("".join(f"kernel/drivers/{m}.ko\n" for m in builtin))
    (mods / "modules.dep").write_text("".join(f"kernel/drivers/{m}.ko.xz: kernel/x.ko.xz\n"
                                              for m in modules))
    return Kernel(version, boot / f"vmlinuz-{version}")


@pytest.fixture(autouse=True)
def fake_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(vm_kernel, "BOOT_DIR", tmp_path / "boot")
    monkeypatch.setattr(vm_kernel, "MODULES_DIR", tmp_path / "modules")
    monkeypatch.delenv("WGJIT_VM_KERNEL", raising=False)


def test_stock_kernel_loads_virtio_that_it_builds_as_modules(tmp_path):
    # Debian 12's linux-image-amd64: CONFIG_VIRTIO_PCI=m, CONFIG_VIRTIO_CONSOLE=m.
    _kernel(tmp_path, "6.1.0-57-amd64", builtin=[], config={
        "CONFIG_VIRTIO_PCI": "m", "CONFIG_VIRTIO_CONSOLE": "m", "CONFIG_9P_FS": "m"},
        modules=["virtio/virtio_pci", "char/virtio_console", "fs/9p"])
    assert vm_kernel.modules_to_load("6.1.0-57-amd64", NEEDED) == [
        "virtio_pci", "virtio_console", "9p"]


def test_built_in_drivers_are_left_out_by_modules_builtin_or_config(tmp_path):
    _kernel(tmp_path, "6.12.1-rt-amd64", builtin=["virtio/virtio_pci"],
            config={"CONFIG_VIRTIO_CONSOLE": "y", "CONFIG_9P_FS": "m"}, modules=["fs/9p"])
    assert vm_kernel.modules_to_load("6.12.1-rt-amd64", NEEDED) == ["9p"]


def test_missing_drivers_are_each_named_with_what_needs_them_and_their_option(tmp_path):
    # Debian 12's cloud kernel: virtio as modules, no 9p at all (CONFIG_NET_9P unset).
    needed = {**NEEDED, "9pnet_virtio": "the host root's transport"}
    _kernel(tmp_path, "6.1.0-1-cloud-amd64", builtin=["virtio/virtio_pci"],
            config={"CONFIG_VIRTIO_CONSOLE": "m"}, modules=["char/virtio_console"])
    with pytest.raises(VMImageError) as info:
        vm_kernel.modules_to_load("6.1.0-1-cloud-amd64", needed)
    msg = str(info.value)
    assert msg.startswith("kernel 6.1.0-1-cloud-amd64 has no 9p (the host root; "
                          "CONFIG_9P_FS is not set), no 9pnet_virtio (the host root's "
                          "transport; CONFIG_NET_9P_VIRTIO is not set)")
    assert "virtio_console" not in msg and "virtio_pci" not in msg


def test_a_kernel_lacking_drivers_is_passed_over_and_refused_by_name(tmp_path, monkeypatch):
    # Stock and cloud side by side: the stock one serves; naming the cloud one in
    # $WGJIT_VM_KERNEL says why it cannot, and with only the cloud one the error
    # when nothing is usable carries the same reason.
    _kernel(tmp_path, "6.1.0-57-amd64", builtin=[], config={"CONFIG_9P_FS": "m"},
            modules=["virtio/virtio_pci", "char/virtio_console", "fs/9p"])
    _kernel(tmp_path, "6.1.0-57-cloud-amd64", builtin=[], config={},
            modules=["virtio/virtio_pci", "char/virtio_console"])
    monkeypatch.setattr(vm_kernel, "stock_version", lambda: "6.1.0-57-amd64")
    usable, rejected = vm_kernel.survey(NEEDED)
    assert [k.version for k in usable] == ["6.1.0-57-amd64"]
    assert list(rejected) == ["6.1.0-57-cloud-amd64"]
    assert "has no 9p (the host root; CONFIG_9P_FS is not set)" in rejected[
        "6.1.0-57-cloud-amd64"]
    assert vm_kernel.choose(usable, "9p", rejected).version == "6.1.0-57-amd64"
    monkeypatch.setenv("WGJIT_VM_KERNEL", "6.1.0-57-cloud-amd64")
    with pytest.raises(VMImageError, match=r"WGJIT_VM_KERNEL=6\.1\.0-57-cloud-amd64 cannot "
                                           r"be used: kernel \S+ has no 9p \("):
        vm_kernel.choose(usable, "9p", rejected)
    monkeypatch.delenv("WGJIT_VM_KERNEL")
    (tmp_path / "boot" / "vmlinuz-6.1.0-57-amd64").unlink()
    usable, rejected = vm_kernel.survey(NEEDED)
    assert usable == []
    with pytest.raises(VMImageError, match=r"no usable kernel .*; kernel 6\.1\.0-57-cloud-amd64 "
                                           r"has no 9p \("):
        vm_kernel.choose(usable, "9p", rejected)


def test_module_names_normalise_dashes_and_compression(tmp_path):
    _kernel(tmp_path, "6.1.0-2-amd64", builtin=["net/9pnet-virtio"], config={},
            modules=["virtio/virtio-pci"])
    assert vm_kernel.builtin_modules("6.1.0-2-amd64") == {"9pnet_virtio"}
    assert vm_kernel.loadable_modules("6.1.0-2-amd64") == {"virtio_pci"}


def test_stock_kernel_is_preferred_over_a_newer_flavour(tmp_path, monkeypatch):
    for v in ("6.1.0-57-amd64", "6.12.117+deb12-rt-amd64", "6.1.0-9-amd64"):
        _kernel(tmp_path, v, builtin=[], config={}, modules=[])
    monkeypatch.setattr(vm_kernel, "stock_version", lambda: "6.1.0-57-amd64")
    order = [k.version for k in vm_kernel.installed_kernels()]
    assert order == ["6.1.0-57-amd64", "6.12.117+deb12-rt-amd64", "6.1.0-9-amd64"]
    assert vm_kernel.choose(vm_kernel.installed_kernels(), "x").version == "6.1.0-57-amd64"
    # Without the stock metapackage the newest wins; the environment overrides both.
    monkeypatch.setattr(vm_kernel, "stock_version", lambda: None)
    assert vm_kernel.choose(vm_kernel.installed_kernels(), "x").version \
        == "6.12.117+deb12-rt-amd64"
    monkeypatch.setenv("WGJIT_VM_KERNEL", "6.1.0-9-amd64")
    assert vm_kernel.choose(vm_kernel.installed_kernels(), "x").version == "6.1.0-9-amd64"


def test_a_kernel_without_modules_is_not_offered_and_a_wrong_choice_is_named(tmp_path,
                                                                            monkeypatch):
    _kernel(tmp_path, "6.1.0-57-amd64", builtin=[], config={}, modules=[])
    (tmp_path / "boot" / "vmlinuz-6.1.0-3-amd64").write_bytes(b"")  # no /lib/modules
    assert [k.version for k in vm_kernel.installed_kernels()] == ["6.1.0-57-amd64"]
    monkeypatch.setenv("WGJIT_VM_KERNEL", "6.1.0-3-amd64")
    with pytest.raises(VMImageError, match="WGJIT_VM_KERNEL=6.1.0-3-amd64 is not among them"):
        vm_kernel.choose(vm_kernel.installed_kernels(), "9p")
