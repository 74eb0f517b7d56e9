"""`make gpu-check` cannot rot before its first GPU run: its dry run (the same script,
benchmarks/gpu_check.py --dry-run: CPU device, tiny sizes, no build, no sanitizer) runs
every step and writes the report: gpu_check.json, summary.md and the logs, with a row for
every model and sigma of the plan, every precision mode, and the compiled and bfloat16
rows of overhead.py (torch.compile's eager backend in the dry run)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    return out, proc


def test_dry_run_passes_and_prints_the_summary(dry_run):
    _, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "# gpu-check (dry run: CPU, tiny sizes)" in proc.stdout
    assert "gpu-check: PASSED" in proc.stdout


def test_report_files_exist(dry_run):
    out, _ = dry_run
    for rel in ("gpu_check.json", "summary.md", "logs/pytest_gpu.log",
                "logs/pytest_cpu_exactness.log", "logs/probe.log", "overhead_small.json",
                "overhead_small.md", "precision_small.json", "compiled_small.json",
                "compiled_small.md", "vs_monte_carlo_small.json",
                "vs_monte_carlo_small.md"):
        assert (out / rel).is_file(), rel
    assert "-m gpu" in (out / "logs/pytest_gpu.log").read_text()


def test_every_step_ran(dry_run):
    out, _ = dry_run
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] and result["passed"] and result["device"] == "cpu"
    status = {rec["name"]: rec["status"] for rec in result["steps"]}
    assert status == {"build": "dry-run", "probe": "ok", "pytest -m gpu": "ok",
                      "memcheck cpp": "ok", "overhead small": "ok", "precision small": "ok",
                      "compiled small": "ok", "vs_monte_carlo small": "ok", "CPU exactness tests": "ok"}, status
    tests = {rec["name"]: rec.get("counts") for rec in result["steps"]}
    assert tests["pytest -m gpu"].get("skipped", 0) > 0      # the gpu cases, skipped here
    assert tests["CPU exactness tests"]["collected"] > 0
    memcheck = next(rec for rec in result["steps"] if rec["name"] == "memcheck cpp")
    assert all(v["counts_equal_torch"] for k, v in memcheck["result"].items()
               if k.startswith("margin_"))


def test_rows_for_every_model_sigma_and_mode(dry_run):
    out, _ = dry_run
    result = json.loads((out / "gpu_check.json").read_text())
    plan = gc.plan(dry_run=True)
    head = {(h["model"], h["sigma"]): h for h in result["headline"]}
    assert set(head) == {(m, s) for m in plan["models"] for s in plan["sigmas"]}
    for h in head.values():
        assert h["L"] > 0 and h["dssn_s_per_image"] > 0 and h["mc_s_per_image"] > 0
        assert h["mc_method"].startswith("extrapolated")
        assert set(h["certify_over_forward"]) == {"cpp"} and h["naive_over_forward"] > 0
    prec = result["reports"]["precision"]["small"]["rows"]
    assert {(r["mode"], r["sigma"]) for r in prec} == \
        {(m, s) for m in gc.MODES for s in plan["sigmas"]}
    for r in prec:
        assert r["certify_s"] > 0 and r["forward_s"] > 0
        if r["mode"] == "fp32":
            assert r["votes_moved_vs_fp32"] == 0 and r["predictions_agree_fp32"] == 1.0
    compiled = result["reports"]["compiled"]["small"]
    assert compiled["environment"]["compile_backend"] == plan["compile_backend"] == "eager"
    assert [r["sigma"] for r in compiled["precision"]] == list(plan["compiled_sigmas"])
    for r in compiled["precision"]:
        assert list(r["configs"]) == ["forward", "eager fp32", "compiled",
                                      "bf16 autocast, channels_last",
                                      "compiled + bf16, channels_last"]
        assert r["configs"]["forward"]["ratio_to_forward"] == 1.0
        assert r["configs"]["eager fp32"]["votes_differ"] == 0
        for name, c in r["configs"].items():
            assert c["median_s"] > 0 and c["ratio_to_forward"] > 0
            if name != "forward":
                assert c["votes_differ"] >= 0 and "compile_s" in c
        # one compilation per compiled configuration, none in the timed repetitions
        assert r["configs"]["compiled"]["graphs_first_call"] >= 1
        assert r["graphs_during_repeats"] == 0
    memory = result["reports"]["overhead"]["small"]["memory"]["summary"]
    assert memory and all(len(m["L"]) == len(plan["sigmas"]) for m in memory)


def test_summary_sections_and_tables(dry_run):
    out, _ = dry_run
    md = (out / "summary.md").read_text()
    for section in ("## Steps", "## compute-sanitizer memcheck",
                    "## Certification time per image", "## Precision",
                    "## Compiled and bfloat16", "## Peak memory against L"):
        assert section in md, section
    lines = md.splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            block = []
            for row in lines[i:]:
                if not row.startswith("|"):
                    break
                block.append(row)
            widths = {len(row.strip().strip("|").split("|")) for row in block}
            assert len(widths) == 1 and len(block) >= 3, block
            tables += 1
    assert tables == 6
    compiled = md.split("## Compiled and bfloat16")[1].split("##")[0]
    for run in ("forward only, eager fp32", "certify, eager fp32", "certify, compiled",
                "certify, bf16 autocast, channels_last",
                "certify, compiled + bf16, channels_last"):
        assert f"| {run} |" in compiled, run
    assert "/ fp32 forward" in compiled and "votes differ" in compiled


def test_pytest_counts_reads_the_closing_line():
    text = "....\n3 failed, 120 passed, 4 skipped, 2 deselected in 9.1s\n"
    assert gc.pytest_counts(text) == {"failed": 3, "passed": 120, "skipped": 4,
                                      "deselected": 2}
    assert gc.pytest_counts("1 error in 0.2s") == {"error": 1}
    assert gc.pytest_counts("nothing here") == {}


def test_sanitizer_step_runs_the_tool_and_reads_its_summary(tmp_path, monkeypatch):
    """The GPU branch of the sanitizer step, on the CPU: a stand-in compute-sanitizer runs
    the target after the options and prints the tool's closing line."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f'#!/bin/sh\nwhile [ "$1" != "{sys.executable}" ]; do shift; done\n'
                    '"$@"\nrc=$?\necho "========= ERROR SUMMARY: 0 errors"\nexit $rc\n')
    fake.chmod(0o755)
    monkeypatch.setattr(gc, "find_sanitizer", lambda: str(fake))
    runner = gc.Runner(tmp_path / "out", 120, sys.executable)
    plan = dict(gc.plan(dry_run=True), device="cpu")
    state = {"probe": {"backends": ["torch", "cpp"]}}      # cuda, triton: not here
    gc.step_sanitizer(runner, plan, False, state)
    (rec,) = runner.records
    assert rec["name"] == "memcheck torch" and rec["status"] == "ok", runner.log_text(rec)
    assert rec["command"].startswith(f"{fake} --tool memcheck --error-exitcode 97")
    assert rec["sanitizer_errors"] == 0
    assert all(v["counts_equal_torch"] for k, v in rec["result"].items()
               if k.startswith("margin_"))


def test_sanitizer_step_says_so_without_the_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "find_sanitizer", lambda: None)
    runner = gc.Runner(tmp_path / "out", 120, sys.executable)
    gc.step_sanitizer(runner, dict(gc.plan(dry_run=True), device="cpu"), False,
                      {"probe": {"backends": ["torch"]}})
    (rec,) = runner.records
    assert rec["status"] == "unavailable" and "not found" in rec["detail"]


def test_sanitizer_that_refuses_the_device_is_unavailable_not_failed(tmp_path, monkeypatch):
    """compute-sanitizer refusing the machine (as under gVisor: 'Device not supported',
    then the target's first allocation fails) is the tool's limit, said so once, and the
    other backends are not tried; a target that fails under a working tool stays failed."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\necho '========= Error: Device not supported. Please refer "
                    "to the Supported Devices section'\necho '========= ERROR SUMMARY: 1 "
                    "error'\nexit 97\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gc, "find_sanitizer", lambda: str(fake))
    runner = gc.Runner(tmp_path / "out", 120, sys.executable)
    plan = dict(gc.plan(dry_run=True), device="cpu")
    gc.step_sanitizer(runner, plan, False, {"probe": {"backends": ["torch", "cpp"]}})
    (rec,) = runner.records
    assert rec["status"] == "unavailable", rec
    assert "Device not supported" in rec["detail"] and "memcheck not run" in rec["detail"]

    broken = tmp_path / "broken"
    broken.mkdir()
    fake.write_text("#!/bin/sh\necho '========= Invalid __global__ write of size 4'\n"
                    "echo '========= ERROR SUMMARY: 1 error'\nexit 97\n")
    runner = gc.Runner(broken, 120, sys.executable)
    gc.step_sanitizer(runner, plan, False, {"probe": {"backends": ["torch"]}})
    (rec,) = runner.records
    assert rec["status"] == "failed" and rec["detail"] == "1 memcheck error(s)", rec


def test_pytest_workers_only_with_xdist(monkeypatch):
    import importlib.util as iu
    monkeypatch.setattr(iu, "find_spec", lambda name: object() if name == "xdist" else None)
    assert gc.pytest_workers(4) == ["-n", "4"]
    assert gc.pytest_workers(1) == []
    monkeypatch.setattr(iu, "find_spec", lambda name: None)
    assert gc.pytest_workers(4) == []
    plan = gc.plan(dry_run=False)
    assert plan["pytest_workers"]["gpu_tests"] >= 2
    assert gc.plan(dry_run=True)["pytest_workers"] == {"gpu_tests": 2, "cpu_exactness": 1}


def fake_pytest(tmp_path, output, rc=0):
    """A stand-in for the python that runs pytest: prints ``output``, exits ``rc``."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {rc}\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("dry,reason,status", [
    (False, "could not import 'sklearn': No module named 'sklearn'", "failed"),
    (False, "no CUDA device (torch.cuda.is_available() is False): GPU test skipped", "failed"),
    (True, "could not import 'sklearn': No module named 'sklearn'", "failed"),
    (True, "no CUDA device (torch.cuda.is_available() is False): GPU test skipped", "ok"),
])
def test_gpu_tests_that_skip_leave_the_step_failed(tmp_path, dry, reason, status):
    """On a GPU every test pytest -m gpu selects must run: a skip (a missing package, say)
    fails the step, naming it; only the dry run's 'no CUDA device' skips are expected."""
    python = fake_pytest(tmp_path, f"....s\nSKIPPED [6] tests/test_workflow_devices.py:20: "
                                   f"{reason}\n4 passed, 6 skipped in 1.0s")
    runner = gc.Runner(tmp_path / "out", 120, python)
    gc.step_gpu_tests(runner, gc.plan(dry_run=dry), dry, {})
    (rec,) = runner.records
    assert rec["status"] == status, rec
    assert rec["counts"] == {"passed": 4, "skipped": 6}
    if status == "failed":
        assert "6 GPU test(s) skipped" in rec["detail"] and reason in rec["detail"]
        assert rec["skipped_unexpectedly"] == [f"6 x tests/test_workflow_devices.py:20: {reason}"]


def test_gpu_tests_skipped_by_the_budget_keep_the_budget_as_reason(tmp_path):
    runner = gc.Runner(tmp_path / "out", 5, sys.executable)    # under the 10 s minimum
    gc.step_gpu_tests(runner, gc.plan(dry_run=False), False, {})
    (rec,) = runner.records
    assert rec["status"] == "skipped" and rec["detail"].startswith("time budget"), rec


def test_paper_figures_agree_with_the_benchmarks_and_the_summary_quotes_them(dry_run):
    """The paper's stated point (sigma 3.5) is the same in gpu-check and in bench_common
    (one is not importable before the build); the summary quotes it and marks the figures
    read off the plot as approximate."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_common

    assert gc.PAPER_DSSN_S == {3.5: bench_common.PAPER_SIGMA35_SECONDS["dssn"]}
    assert gc.PAPER_MC_S == {3.5: bench_common.PAPER_SIGMA35_SECONDS["uniform_mc"]}
    out, _ = dry_run
    md = (out / "summary.md").read_text()
    assert f"DSSN {gc.PAPER_DSSN_S[3.5]} s/image and Monte Carlo {gc.PAPER_MC_S[3.5]}" in md
    assert "read off the plot (approximate)" in md
