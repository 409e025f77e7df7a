"""The benchmarks keep working: each runs at a tiny size (no timing is asserted)."""

import os
import subprocess
import sys

import pytest

from conftest import SHARED_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_DATA), reason="../shared/data is not present in this checkout")
def test_tokenize_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "tokenize_vs_trl.py"), "--rows", "400", "--vocab-size", "2000"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio raydpo / TRL pairs/s" in out.stdout
    # 400 rows of hh-rlhf include 1 empty chosen response (row 86): quarantined, as counted.
    assert "(+1 quarantined" in out.stdout
