"""Device-agnostic code: CUDA is reached only through megalith/device.py (DESIGN principle 4)."""

import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megalith"
DEVICE_HELPER = PACKAGE / "device.py"


def sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, "the package was not found"
    return files


def test_no_bare_cuda_calls():
    offenders = [f"{p}:{n}" for p in sources() for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\.cuda\(", line)]
    assert not offenders, offenders


def test_torch_cuda_only_in_the_device_helper():
    offenders = [f"{p}:{n}" for p in sources() if p != DEVICE_HELPER
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "torch.cuda" in line]
    assert not offenders, offenders
