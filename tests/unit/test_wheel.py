"""The wheel deploys ship to gateways: the appliance and nothing else.

Built the way the deploy builds it (`pip wheel --no-deps`, the project's own
build backend), from a copy of the checkout so the build leaves nothing in it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "appliance", src / "appliance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Everything the checkout holds beside the package, to show none of it is picked up.
    shutil.copytree(ROOT / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [whl] = out.glob("wgjit-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_the_initiation_builder_is_not_shipped(wheel_names: list[str]) -> None:
    assert (ROOT / "tests" / "initiations.py").is_file()  # it exists, in the checkout
    assert not [n for n in wheel_names if "initiations" in n or "handshake_testing" in n]


def test_the_wheel_holds_the_appliance_only(wheel_names: list[str]) -> None:
    code = [n for n in wheel_names if n.endswith(".py")]
    assert "appliance/gateway/handshake.py" in code
    assert "appliance/cli.py" in code
    assert all(n.startswith("appliance/") for n in code), code
