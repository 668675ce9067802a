"""`lmport bench moe` times the three expert paths on the same weights and checks that they agree."""

from __future__ import annotations

import json
import subprocess
import sys


def test_moe_bench_times_three_paths_that_agree():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "moe", "--hidden", "64",
                          "--intermediate", "96", "--tokens", "1", "9", "--rounds", "2", "--dtype", "float32",
                          "--json"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    assert result["shape"]["experts"] == 8 and [row["tokens"] for row in result["rows"]] == [1, 9]
    for row in result["rows"]:
        assert set(row["ms"]) == {"grouped", "transformers", "per_token"}
        assert row["max_rel_disagreement"] < 1e-5
        assert row["speedup_vs_per_token"] == row["ms"]["per_token"] / row["ms"]["grouped"]
