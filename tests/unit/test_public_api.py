"""The package's public names resolve, and importing the package needs no MLX."""

import subprocess
import sys

import pytest

import simulref


@pytest.mark.parametrize("name", sorted(simulref._EXPORTS))
def test_every_export_resolves(name):
    assert getattr(simulref, name) is getattr(
        __import__(simulref._EXPORTS[name], fromlist=[name]), name
    )


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        simulref.no_such_name  # noqa: B018


def test_pure_modules_import_without_mlx():
    code = (
        "import sys, simulref, simulref.prompt, simulref.trace, simulref.metrics, "
        "simulref.verify, simulref.quality, simulref.policy, simulref.config; "
        "simulref.DecodeConfig(k=2).settings('m', engine='prefilled'); "
        "simulref.check_trace; simulref.Trace; "
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
