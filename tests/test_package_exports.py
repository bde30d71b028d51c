"""Each package's advertised public names resolve, and importing a package pulls in no torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["storage", "extractor", "aggregator", "aggregator.svm"])
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(module, "not_a_name")  # noqa: B009


@pytest.mark.parametrize("package", ["extractor", "aggregator", "aggregator.svm"])
def test_importing_the_package_is_light(package: str) -> None:
    code = f"import sys, {package}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
