"""`lmport bench embed` measures both sides, alternating, and checks that their vectors agree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_embed_bench_alternates_lmport_and_sentence_transformers():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "embed", "--num-texts", "8",
                          "--rounds", "2", "--json"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    assert result["workload"]["model"] == "all-MiniLM-L6-v2" and result["workload"]["num_texts"] == 8
    assert [len(v) for v in result["embeddings_per_s"].values()] == [2, 2]
    medians = result["median_embeddings_per_s"]
    assert result["ratio"] == pytest.approx(medians["lmport"] / medians["sentence_transformers"])
    assert result["min_cosine"] > 0.9999
