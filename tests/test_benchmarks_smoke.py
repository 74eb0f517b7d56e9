"""Smoke test of benchmarks/overhead.py: the --quick run writes the JSON and markdown
reports with the expected structure. No timing is asserted."""
import importlib.util
import json
from pathlib import Path

import pytest

import dssn_kernels as dk

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("benchmarks_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_quick_writes_reports(overhead, tmp_path):
    result = overhead.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data == json.loads(json.dumps(result))
    md = (tmp_path / "overhead.md").read_text()
    assert md.startswith("# ") and "| sigma |" in md and "certify_" in md

    env = data["environment"]
    for key in ("torch", "cpu_model", "torch_threads", "backends", "model", "batch_size",
                "images", "repeats", "quick", "q"):
        assert key in env, key
    assert env["quick"] is True and env["images"] == 2 and env["batch_size"] == 256
    backends = [b for b in ("cpp", "torch") if b in dk.available_backends()]
    assert env["backends"] == backends

    assert len(data["timings"]) == 1
    row = data["timings"][0]
    assert row["sigma"] == 0.25 and row["L"] == dk.num_variants(0.25) == 220
    assert row["inputs"] == 2 * 220
    expected = {"forward", "naive"} | {f"certify_{b}" for b in backends}
    assert set(row["methods"]) == expected
    for m in row["methods"].values():
        assert set(m) >= {"median_s", "min_s", "times_s", "ratio_median", "ratio_min"}
        assert len(m["times_s"]) == env["repeats"] and m["median_s"] > 0
    assert row["methods"]["forward"]["ratio_median"] == 1.0
    # Every backend counts exactly the same votes (the first certify is the reference).
    moved = row["votes_moved"]["moved"]
    assert all(moved[f"certify_{b}"] == 0 for b in backends)
    assert set(row["kernels"]) == set(backends)
    for k in row["kernels"].values():
        assert set(k) >= {"expand_s", "vote_s", "noop_certify_s", "expand_per_forward",
                          "vote_per_forward", "noop_certify_per_forward"}

    mem = data["memory"]
    assert mem["summary"][0]["run"] == f"certify_{backends[0]}"
    assert mem["summary"][0]["sigmas"] == [0.25, 3.5]
    assert mem["summary"][0]["L"] == [220, 3091]
    assert len(mem["summary"][0]["peak_increase_bytes"]) == 2
    assert all(p["peak_rss_bytes"] > 0 for p in mem["probes"])
