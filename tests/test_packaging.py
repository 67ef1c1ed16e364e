"""The wheel carries the config groups, so an installed cl-bench finds its presets."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_preset(tmp_path):
    # offline: the venv's hatchling (the test extra) builds it, nothing is fetched
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(ROOT), "-w", str(tmp_path)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("cl_bench-*.whl"))).namelist()
    for group in ("strategies", "scenarios", "models"):
        expected = {f"cl_bench/presets/{group}/{p.name}" for p in (ROOT / group).glob("*.yaml")}
        assert expected <= set(names)
    assert "cl_bench/cli.py" in names and not any(n.startswith("tests/") for n in names)
