"""stages/__init__.py: TensorFlow's runtime switches, set before any stage imports it."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = ("import stages, tensorflow; from tensorflow.python.util import _pywrap_util_port as p; "
         "print(p.IsMklEnabled())")


@pytest.mark.parametrize("setting,expected", [(None, "True"), ("0", "False")])
def test_onednn_kernels_are_on_unless_the_user_says_otherwise(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected
