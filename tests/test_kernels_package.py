"""megalith_kernels imports beside Hugging Face's `kernels`, and its dispatch refuses clearly."""

import subprocess
import sys

import pytest
import torch

import megalith_kernels
from megalith_kernels import KernelUnavailable, dispatch


def test_imports_beside_transformers_and_hf_kernels(tmp_path):
    # run outside the repository: from its root, `import kernels` would find the kernels/ folder
    code = ("import transformers, megalith_kernels, kernels; "
            "assert megalith_kernels.__file__ != kernels.__file__; print(megalith_kernels.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "megalith_kernels"


def test_auto_is_the_reference_on_cpu():
    assert megalith_kernels.resolve_backend("cpu") == "torch"
    assert megalith_kernels.implementation("rms_norm", "cpu") is megalith_kernels.reference.rms_norm


def test_unknown_backend_and_op_are_one_line():
    with pytest.raises(KernelUnavailable, match="not one of auto, torch, triton"):
        megalith_kernels.resolve_backend("cpu", "cuda-magic")
    with pytest.raises(KernelUnavailable, match="no kernel op"):
        megalith_kernels.implementation("softmax", "cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        megalith_kernels.resolve_backend("cpu", "triton")


def test_triton_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    with pytest.raises(KernelUnavailable, match=r"pip install 'megalith\[triton\]'"):
        megalith_kernels.resolve_backend("cpu", "triton")
    assert megalith_kernels.resolve_backend(torch.device("cpu"), "auto") == "torch"


def test_from_the_repository_root_kernels_is_still_hugging_faces():
    """With the repository root on sys.path, `import kernels` finds the kernels/ folder first; it
    hands the name to the installed package, so transformers' hub-kernels import still works."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    code = ("import transformers.integrations.hub_kernels, kernels, megalith_kernels; "
            "print(kernels.__file__ != megalith_kernels.__file__, megalith_kernels.resolve_backend('cpu'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "torch"]
