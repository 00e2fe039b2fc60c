"""The libvirt helper's pure parts: where Vagrant runs, reading virsh's tables."""

from __future__ import annotations

from lab.libvirt_daemons import Libvirt, vol_names

BOX_VOL = "wgjit-VAGRANTSLASH-bookworm-lab_vagrant_box_image_0.1_box.img"
VOL_LIST = "\n".join([
    " Name" + " " * 60 + "Path",
    "-" * 110,
    " vagrant_c1.img" + " " * 40 + "/var/lib/libvirt/images/vagrant_c1.img",
    f" {BOX_VOL}     /var/lib/libvirt/images/{BOX_VOL}",
    "", ""])


def test_vol_names_reads_the_table():
    assert vol_names(VOL_LIST) == ["vagrant_c1.img", BOX_VOL]
    assert vol_names(" Name   Path\n------------\n\n") == []
    assert vol_names("") == []


def test_vagrant_runs_in_libvirts_namespace_when_it_has_one():
    assert Libvirt("wgjit-virt", {}).argv(["vagrant", "up"]) == [
        "ip", "netns", "exec", "wgjit-virt", "vagrant", "up"]
    assert Libvirt(None, {}).argv(["vagrant", "up"]) == ["vagrant", "up"]
