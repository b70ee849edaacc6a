"""The built wheel ships kernels/ as megalith_kernels (never as a top-level `kernels`), and the
installed copy imports beside transformers and Hugging Face's `kernels` in one process.

tests/test_kernels_package.py checks the same import through the editable install; this builds
a real wheel from a copy of the sources (so the checkout gains no build/ or egg-info) and
installs it into a folder of its own. Slow: pip builds and installs (about half a minute).
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "megalith", "kernels")

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: with the repository root on it (how its tests run), the
    folder kernels/ shadows Hugging Face's `kernels`, whose setuptools hook (an egg_info writer,
    `kernels._internals.locking`) then fails to import and breaks any build in that process."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=clean_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **kwargs)
    pip("wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), cwd=source)
    (built,) = (work / "dist").glob("megalith-*.whl")
    return built


def test_the_wheel_holds_megalith_kernels_and_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "megalith_kernels/__init__.py" in names and "megalith_kernels/dispatch.py" in names
    for sub in ("reference", "triton_ops"):
        assert f"megalith_kernels/{sub}/__init__.py" in names
        assert any(n.startswith(f"megalith_kernels/{sub}/") and not n.endswith("__init__.py") for n in names)
    assert "megalith/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_the_installed_wheel_imports_beside_transformers_and_hf_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    assert (site / "megalith_kernels" / "__init__.py").is_file() and not (site / "kernels").exists()
    # the target first on sys.path, the working directory outside the repository
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); "
            "import transformers, megalith_kernels, kernels; "
            "from megalith_kernels import reference, dispatch; "
            f"assert megalith_kernels.__file__.startswith({str(site)!r}), megalith_kernels.__file__; "
            "assert not kernels.__file__.startswith(sys.path[0]), kernels.__file__; "
            "print(megalith_kernels.__name__, reference.rms_norm.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["megalith_kernels", "megalith_kernels.reference.norms"]
