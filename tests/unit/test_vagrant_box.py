"""The Vagrant box's pure parts: recipe hash, versions, metadata, disk layout, guest files."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

from lab import vagrant_box
from lab.vm import image as vm_image

KEY = "ssh-rsa AAAAB3Nza insecure"


def test_recipe_hash_is_stable_and_follows_every_input(monkeypatch):
    base = vagrant_box.recipe_hash("http://m.example/debian", KEY)
    assert base == vagrant_box.recipe_hash("http://m.example/debian", KEY)
    assert len(base) == 16
    assert base != vagrant_box.recipe_hash("http://other.example/debian", KEY)
    assert base != vagrant_box.recipe_hash("http://m.example/debian", KEY + "x")
    monkeypatch.setattr(vagrant_box, "NETWORKD_DHCP", vagrant_box.NETWORKD_DHCP + "#\n")
    assert base != vagrant_box.recipe_hash("http://m.example/debian", KEY)


def test_a_package_the_deploy_adds_changes_the_recipe(monkeypatch):
    before = vagrant_box.recipe_hash("http://m.example/debian", KEY)
    monkeypatch.setattr(vm_image.packages, "CLIENT", [*vm_image.packages.CLIENT, "tcpdump"])
    assert "tcpdump" in vagrant_box.box_packages()
    assert vagrant_box.recipe_hash("http://m.example/debian", KEY) != before


def test_box_carries_every_package_the_deploy_installs():
    pkgs = vagrant_box.box_packages()
    assert set(vm_image.image_packages()) <= set(pkgs)
    assert {"linux-image-cloud-amd64", "grub-pc", "openssh-server", "sudo"} <= set(pkgs)
    assert pkgs == sorted(set(pkgs))


def test_versions_differ_per_recipe_and_are_numeric():
    a, b = vagrant_box.box_version("0000001f" * 2), vagrant_box.box_version("ffffffff" * 2)
    assert a == "0.1"
    assert b == f"0.{0xfffffff}"
    assert all(part.isdigit() for part in b.split("."))


def test_metadata_and_catalog(tmp_path):
    assert vagrant_box.metadata() == {"provider": "libvirt", "format": "qcow2",
                                      "virtual_size": vagrant_box.DISK_GIB}
    box = tmp_path / "b.box"
    doc = vagrant_box.catalog("00000abc" * 2, box, "f" * 64)
    assert doc["name"] == vagrant_box.BOX_NAME
    (version,) = doc["versions"]
    assert version["version"] == "0.171"
    (prov,) = version["providers"]
    assert prov == {"name": "libvirt", "url": f"file://{box}", "checksum_type": "sha256",
                    "checksum": "f" * 64}
    json.dumps(doc)


def test_added_versions_reads_vagrant_box_list():
    out = ("debian/bookworm64   (libvirt, 12.20240905.1)\n"
           "wgjit/bookworm-lab  (libvirt, 0.171)\n"
           "wgjit/bookworm-lab  (libvirt, 0.9, (amd64))\n"
           "wgjit/bookworm-lab  (virtualbox, 0.5)\n"
           "wgjit/bookworm-lab2 (libvirt, 0.7)\n")
    assert vagrant_box.added_versions(out) == ["0.171", "0.9"]
    assert vagrant_box.added_versions("There are no installed boxes!\n") == []


def test_one_partition_at_one_mib_to_the_end():
    script = vagrant_box.sfdisk_script(8 << 30)
    assert script.startswith("label: dos\n")
    fields = dict(f.strip().split("=") for f in script.splitlines()[1].split(",")
                  if "=" in f)
    assert int(fields["start"]) * 512 == vagrant_box.PART_OFFSET == 1 << 20
    assert (int(fields["start"]) + int(fields["size"])) * 512 == 8 << 30
    assert fields["type"] == "83" and "bootable" in script


def test_networkd_file_is_dhcp_and_sorts_after_vagrants_own():
    cfg = configparser.ConfigParser()
    cfg.read_string(vagrant_box.NETWORKD_DHCP)
    assert cfg["Match"]["Name"].split() == ["en*", "eth*"]
    assert cfg["Network"]["DHCP"] == "ipv4"
    # Vagrant's private-network files are 50-vagrant-<if>.network: first match wins.
    assert "99-wgjit-dhcp.network" > "50-vagrant-eth1.network"


def test_grub_cfg_boots_the_kernel_from_the_filesystem_uuid():
    cfg = vagrant_box.grub_cfg("vmlinuz-6.1.0-1-cloud-amd64", "initrd.img-6.1.0-1-cloud-amd64",
                               "1234-uuid")
    assert "search --no-floppy --fs-uuid --set=root 1234-uuid" in cfg
    linux = next(line.split() for line in cfg.splitlines() if line.strip().startswith("linux"))
    assert linux[1] == "/boot/vmlinuz-6.1.0-1-cloud-amd64"
    assert "root=UUID=1234-uuid" in linux and "console=ttyS0,115200" in linux
    assert "initrd /boot/initrd.img-6.1.0-1-cloud-amd64" in cfg
    assert "set timeout=0" in cfg


def test_guest_files_grant_vagrant_sudo_and_make_host_keys_per_vm():
    assert vagrant_box.SUDOERS.splitlines()[0] == "vagrant ALL=(ALL) NOPASSWD: ALL"
    unit = configparser.ConfigParser()
    unit.read_string(vagrant_box.SSH_KEYGEN_UNIT)
    assert unit["Unit"]["Before"] == "ssh.service"
    assert unit["Service"]["ExecStart"] == "/usr/bin/ssh-keygen -A"


def test_insecure_key_missing_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(vagrant_box, "INSECURE_KEY_GLOB", str(tmp_path / "none/*.pub"))
    with pytest.raises(vagrant_box.VMImageError, match="apt-get install vagrant"):
        vagrant_box.insecure_key()
    (tmp_path / "none").mkdir()
    Path(tmp_path / "none/vagrant.pub").write_text(KEY + "\n")
    assert vagrant_box.insecure_key() == KEY


def _disk_with_partition_table(tmp_path: Path) -> tuple[Path, bytes]:
    disk = tmp_path / "disk.raw"
    mbr = bytearray(512)
    mbr[440:446] = b"SIGNAT"
    mbr[446:462] = bytes(range(16))  # partition 1
    mbr[510:] = b"\x55\xaa"
    disk.write_bytes(bytes(mbr) + b"\xee" * (vagrant_box.PART_OFFSET * 2 - 512))
    return disk, bytes(mbr)


def test_boot_code_goes_before_the_partition_table_and_core_after_the_mbr(tmp_path):
    disk, mbr = _disk_with_partition_table(tmp_path)
    boot = bytes([0xb0]) * 510 + b"\x55\xaa"
    core = b"CORE" * 1000
    vagrant_box.write_boot_code(disk, boot, core)
    data = disk.read_bytes()
    assert data[:440] == boot[:440]
    assert data[440:512] == mbr[440:512]  # signature, partition table, 0x55aa kept
    assert data[512:512 + len(core)] == core
    assert data[512 + len(core):vagrant_box.PART_OFFSET] == b"\xee" * (
        vagrant_box.PART_OFFSET - 512 - len(core))  # the filesystem's side untouched
    assert len(data) == vagrant_box.PART_OFFSET * 2


def test_boot_code_refuses_what_does_not_fit(tmp_path):
    disk, _ = _disk_with_partition_table(tmp_path)
    before = disk.read_bytes()
    with pytest.raises(vagrant_box.VMImageError, match="boot sector"):
        vagrant_box.write_boot_code(disk, b"\0" * 512, b"core")
    with pytest.raises(vagrant_box.VMImageError, match="gap before the partition"):
        vagrant_box.write_boot_code(disk, b"\0" * 510 + b"\x55\xaa",
                                    b"x" * vagrant_box.PART_OFFSET)
    assert disk.read_bytes() == before


def test_stale_volumes_are_older_versions_of_this_box_only():
    prefix = "wgjit-VAGRANTSLASH-bookworm-lab_vagrant_box_image_"
    assert vagrant_box.volume_prefix() == prefix
    vols = [f"{prefix}0.5_box.img", f"{prefix}0.7_box.img", "vagrant_c1.img",
            "debian-VAGRANTSLASH-bookworm64_vagrant_box_image_12.1_box.img"]
    assert vagrant_box.stale_volumes(vols, "0.7") == [f"{prefix}0.5_box.img"]
    assert vagrant_box.stale_volumes(vols, "0.9") == [f"{prefix}0.5_box.img",
                                                      f"{prefix}0.7_box.img"]
