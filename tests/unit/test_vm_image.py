"""The VM image's inputs: the mirror from apt sources, the kernel, the recipe hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.vm import image as vm_image
from lab.vm.initramfs import VMImageError

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def _sources(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    monkeypatch.setattr(vm_image, "APT_SOURCES", [tmp_path / "sources.list", d])
    monkeypatch.delenv("WGJIT_DEBIAN_MIRROR", raising=False)


def test_mirror_from_deb822_sources(tmp_path, monkeypatch):
    _sources(tmp_path, monkeypatch, {"debian.sources": DEB822})
    assert vm_image.debian_mirror() == "http://mirror.example/debian"


def test_mirror_from_one_line_list_skips_other_suites_and_disabled(tmp_path, monkeypatch):
    _sources(tmp_path, monkeypatch, {
        "a.sources": "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
                     "Components: main\nEnabled: no\n",
        "b.list": "# deb http://commented.example/debian bookworm main\n"
                  "deb http://other.example/debian trixie main\n"
                  "deb [arch=amd64 signed-by=/k.gpg] https://one.example/debian bookworm main\n",
        "c.list.disabled-by-farm": "deb http://ignored.example/debian bookworm main\n",
    })
    assert vm_image.debian_mirror() == "https://one.example/debian"


def test_no_mirror_is_a_clear_error_and_env_wins(tmp_path, monkeypatch):
    _sources(tmp_path, monkeypatch, {"x.list": "deb http://other.example/debian trixie main\n"})
    with pytest.raises(VMImageError, match="WGJIT_DEBIAN_MIRROR"):
        vm_image.debian_mirror()
    monkeypatch.setenv("WGJIT_DEBIAN_MIRROR", "http://env.example/debian")
    assert vm_image.debian_mirror() == "http://env.example/debian"


def test_recipe_hash_follows_the_inputs(monkeypatch):
    k = vm_image.Kernel("6.1.0-1-cloud-amd64", Path("/boot/vmlinuz-6.1.0-1-cloud-amd64"))
    h = vm_image.recipe_hash(k, "http://m/debian")
    assert h == vm_image.recipe_hash(k, "http://m/debian")
    assert h != vm_image.recipe_hash(k, "http://n/debian")
    monkeypatch.setattr(vm_image, "BASE_PACKAGES", [*vm_image.BASE_PACKAGES, "curl"])
    assert h != vm_image.recipe_hash(k, "http://m/debian")


def test_image_carries_every_package_the_deploy_installs():
    from wgjit_deploy import packages

    assert set(packages.all_roles()) <= set(vm_image.image_packages())
