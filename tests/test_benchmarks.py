"""Every benchmark runs (in its smoke mode: tiny sizes, one round), so none rots unnoticed; the figures of a smoke
run mean nothing and are not checked."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_runs_in_smoke_mode(script):
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "a benchmark prints its figures"
