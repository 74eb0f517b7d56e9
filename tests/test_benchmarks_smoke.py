"""Smoke test of the benchmark suite: ``benchmarks/run_all.py --quick`` runs every step and
writes the JSON, markdown and PNG reports with the expected structure. No timing is
asserted."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import dssn_kernels as dk
from conftest import CPU_BACKENDS
from dssn_kernels.backends import resolve_backend

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV_KEYS = ("device", "device_name", "cpu_model", "torch", "triton", "torch_threads",
            "backends", "model_name", "model", "q", "timestamp")


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = _load("run_all").main(["--quick", "--out", str(out)])
    return out, summary


def check_tables(md: str) -> int:
    """Every markdown table: a head, a |---| separator, rows with as many cells as the head.
    Returns the number of tables."""
    lines, tables, i = md.splitlines(), 0, 0
    while i < len(lines):
        if lines[i].startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            cells = [len(line.strip().strip("|").split("|")) for line in block]
            assert len(block) >= 3, block
            assert set(block[1].strip("|").split("|")) == {"---"}, block[1]
            assert all(c == cells[0] for c in cells), block
            assert all(line.endswith("|") for line in block), block
            tables += 1
        i += 1
    return tables


def is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def backends():
    return [b for b in ("cpp", "torch") if b in CPU_BACKENDS]   # expected (conftest)


def test_summary(suite):
    out, summary = suite
    assert list(summary["steps"]) == ["vs_monte_carlo", "overhead", "overhead_large",
                                      "micro_ops", "early_exit"]
    assert all(s["ok"] for s in summary["steps"].values()), summary["steps"]
    data = json.loads((out / "summary.json").read_text())
    assert data["quick"] is True and data["device"] == "cpu" and data["model"] == "small"
    for s in data["steps"].values():
        assert s["seconds"] >= 0
        for path in s["files"].values():
            assert Path(path).is_file() and Path(path).stat().st_size > 0, path
    md = (out / "summary.md").read_text()
    assert md.startswith("# DSSN benchmark suite (quick)")
    assert check_tables(md) >= 7
    assert check_tables((out / "early_exit.md").read_text()) >= 1
    assert "environment" in json.loads((out / "early_exit.json").read_text())


def test_vs_monte_carlo(suite):
    out, _ = suite
    data = json.loads((out / "vs_monte_carlo.json").read_text())
    env = data["environment"]
    for key in ENV_KEYS + ("mc_n", "mc_n_timed", "n0", "mc_backend", "batch_size"):
        assert key in env, key
    assert env["model_name"] == "small" and env["quick"] is True
    assert env["backends"] == [resolve_backend("auto", "cpu")]
    assert [r["sigma"] for r in data["rows"]] == [0.25, 0.5, 1.0, 2.0, 3.5]
    assert [r["L"] for r in data["rows"]] == [220, 441, 883, 1766, 3091]
    for r in data["rows"]:
        assert r["n_reported"] == 100_000 and r["n0"] == 64
        # quick times Monte Carlo with a small n and says so
        assert r["n_timed"] < r["n_reported"] and r["mc_method"] == "extrapolated"
        assert r["speedup_goal"] == pytest.approx(0.9 * 100_064 / r["L"])
        assert r["speedup"] == pytest.approx(r["mc_s_per_image"] / r["dssn_s_per_image"])
        assert r["meets_goal"] == (r["speedup"] >= r["speedup_goal"])
        assert r["dssn_s_per_image"] > 0 and r["mc_s_per_image"] > 0
        assert r["forward_efficiency"] > 0
    md = (out / "vs_monte_carlo.md").read_text()
    assert md.startswith("# ") and check_tables(md) == 1
    assert "extrapolated" in md and "| sigma | L |" in md and "| 0.5 | 441 |" in md
    assert is_png(out / "vs_monte_carlo.png")


def test_overhead(suite):
    out, _ = suite
    data = json.loads((out / "overhead.json").read_text())
    md = (out / "overhead.md").read_text()
    assert md.startswith("# ") and "| sigma |" in md and "certify_" in md
    assert check_tables(md) == 3
    assert is_png(out / "overhead.png")

    env = data["environment"]
    for key in ENV_KEYS + ("batch_size", "images", "repeats", "quick"):
        assert key in env, key
    assert env["quick"] is True and env["images"] == 2 and env["batch_size"] == 256
    assert env["backends"] == backends()

    assert len(data["timings"]) == 1
    row = data["timings"][0]
    assert row["sigma"] == 0.25 and row["L"] == dk.num_variants(0.25) == 220
    assert row["inputs"] == 2 * 220
    expected = {"forward", "naive"} | {f"certify_{b}" for b in backends()}
    assert set(row["methods"]) == expected
    for m in row["methods"].values():
        assert set(m) >= {"median_s", "min_s", "times_s", "ratio_median", "ratio_min"}
        assert len(m["times_s"]) == env["repeats"] and m["median_s"] > 0
    assert row["methods"]["forward"]["ratio_median"] == 1.0
    # Every backend counts exactly the same votes (the first certify is the reference).
    moved = row["votes_moved"]["moved"]
    assert all(moved[f"certify_{b}"] == 0 for b in backends())
    assert set(row["kernels"]) == set(backends())
    for k in row["kernels"].values():
        assert set(k) >= {"expand_s", "vote_s", "noop_certify_s", "expand_per_forward",
                          "vote_per_forward", "noop_certify_per_forward"}

    mem = data["memory"]
    assert mem["summary"][0]["run"] == f"certify_{backends()[0]}"
    assert mem["summary"][0]["sigmas"] == [0.25, 3.5]
    assert mem["summary"][0]["L"] == [220, 3091]
    assert len(mem["summary"][0]["peak_increase_bytes"]) == 2
    assert all(p["peak_rss_bytes"] > 0 for p in mem["probes"])


def test_overhead_larger_model(suite):
    out, _ = suite
    data = json.loads((out / "overhead_wide.json").read_text())
    assert data["environment"]["model_name"] == "wide" and data["memory"] is None
    row = data["timings"][0]
    assert set(row["methods"]) == {"forward", "naive"} | {f"certify_{b}" for b in backends()}
    md = (out / "overhead_wide.md").read_text()
    assert check_tables(md) == 2 and "naive ratio" in md
    assert is_png(out / "overhead_wide.png")


def test_micro_ops(suite):
    out, _ = suite
    data = json.loads((out / "micro_ops.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert names == {f"test_{op}[{b}-cpu]" for op in ("expand", "vote") for b in backends()}
    env = data["dssn_environment"]
    for key in ("device_name", "torch", "triton", "backends"):
        assert key in env, key
    md = (out / "micro_ops.md").read_text()
    assert check_tables(md) == 1 and "| expand |" in md and "| vote |" in md


def test_cli_bench_runs_the_suite(tmp_path):
    """`dssn bench` runs benchmarks/run_all.py with the given options."""
    from dssn_kernels.workflow.cli import main
    assert main(["bench", "--quick", "--only", "micro_ops", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["micro_ops"] and summary["steps"]["micro_ops"]["ok"]
    assert (tmp_path / "micro_ops.md").is_file()


def test_overhead_precision_rows(tmp_path):
    """benchmarks/overhead.py --precision-only: the rows eager fp32, compiled, bf16 and
    compiled + bf16 against the forward passes, with graphs counted (torch.compile's eager
    backend here: the table and the counting, not inductor's speed)."""
    result = _load("overhead").main(
        ["--quick", "--out", str(tmp_path), "--model", "tiny", "--precision-only",
         "--images", "1", "--repeats", "1", "--compile-backend", "eager"])
    (row,) = result["precision"]
    assert row["L"] == 220 and row["graphs_during_repeats"] == 0
    configs = row["configs"]
    assert list(configs) == ["forward", "eager fp32", "compiled",
                             "bf16 autocast, channels_last", "compiled + bf16, channels_last"]
    assert configs["compiled"]["graphs_first_call"] == 1
    assert configs["compiled"]["votes_differ"] == 0          # the eager backend: same logits
    for name, c in configs.items():
        assert c["median_s"] > 0 and c["speedup_over_forward"] > 0
    md = (tmp_path / "overhead.md").read_text()
    assert "| certify, compiled + bf16, channels_last |" in md and "votes differ" in md
