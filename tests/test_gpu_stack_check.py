"""`make gpu-stack-check` (scripts/gpu_stack_check.py), the GPU machines' stack rehearsed on
a CPU machine, in its fast parts only (no download, no build): which lines of
requirements-dev.txt its venv leaves to torch, that it builds with gpu_check.py's own
command, its defaults (and the Makefile's), the refusal without a CUDA toolkit, and when a
venv counts as complete (a user's venv is never deleted)."""
import os
import re
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_stack_check as gsc  # noqa: E402


def names(lines):
    return [n for n in map(gsc.requirement_name, lines) if n]


def test_requirement_names():
    assert gsc.requirement_name("typing_extensions==4.16.0") == "typing-extensions"
    assert gsc.requirement_name("Jinja2==3.1.6  # a comment") == "jinja2"
    assert gsc.requirement_name("setuptools<82; platform_system == 'Linux'") == "setuptools"
    assert gsc.requirement_name("# torch==2.13.0") is None
    assert gsc.requirement_name("   ") is None


def test_requirements_dev_loses_exactly_torch_triton_and_setuptools():
    text = (ROOT / "requirements-dev.txt").read_text()
    kept, dropped = gsc.filter_requirements(text)
    assert sorted(names(dropped)) == ["setuptools", "torch", "triton"]
    assert len(dropped) == 3
    kept_names = names(kept)
    assert {"numpy", "scipy", "pytest", "hypothesis", "ninja", "build", "matplotlib",
            "scikit-learn", "typing-extensions"} <= set(kept_names)
    assert not {"torch", "triton", "setuptools"} & set(kept_names)
    assert len(kept) + len(dropped) == len(text.splitlines())   # comments kept, none lost


def test_similar_names_are_kept():
    kept, dropped = gsc.filter_requirements("setuptools-scm==8\ntorchvision==0.26\n"
                                            "triton==3.9.0\n")
    assert names(kept) == ["setuptools-scm", "torchvision"] and names(dropped) == ["triton"]


def test_setuptools_comes_from_torchs_metadata():
    requires = ["filelock", "setuptools<82", 'triton==3.6.0; platform_system == "Linux"',
                "sympy>=1.13.3"]
    assert gsc.setuptools_requirements(requires) == ["setuptools<82"]
    assert gsc.setuptools_requirements(["filelock"]) == []


def test_defaults_and_arguments():
    args = gsc.parse_args([])
    assert (args.torch, args.arch) == ("2.11.0", "9.0") == (gsc.TORCH_VERSION, gsc.ARCH)
    assert args.pytest_args == "-q -p no:cacheprovider" and not args.skip_tests
    assert args.venv is None and args.jobs >= 1
    args = gsc.parse_args(["--torch", "2.12.0", "--arch", "8.0", "--venv", "/v", "--skip-tests",
                           "--pytest-args", "-q tests/test_vote.py", "--jobs", "3",
                           "--cache", "/c"])
    assert (args.torch, args.arch, args.venv, args.skip_tests, args.pytest_args, args.jobs,
            args.cache) == ("2.12.0", "8.0", "/v", True, "-q tests/test_vote.py", 3, "/c")


def test_default_cache():
    assert gsc.default_cache({"DSSN_GPU_STACK_CACHE": "/x/y"}) == "/x/y"
    assert gsc.default_cache({"XDG_CACHE_HOME": "/xdg"}) == \
        "/xdg/dssn-kernels/gpu-stack-check"
    assert gsc.default_cache({}).endswith("/.cache/dssn-kernels/gpu-stack-check")


def test_the_makefile_passes_the_same_defaults():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^GPU_STACK_TORCH \?= (\S+)$", text, re.M).group(1) == gsc.TORCH_VERSION
    assert re.search(r"^GPU_STACK_ARCH \?= (\S+)$", text, re.M).group(1) == gsc.ARCH
    rule = re.search(r"^gpu-stack-check:\n\t(.*)$", text, re.M).group(1)
    assert "scripts/gpu_stack_check.py" in rule and "$(GPU_STACK_TORCH)" in rule
    assert "$(GPU_STACK_ARCH)" in rule
    assert "gpu-stack-check" not in (ROOT / ".ci" / "run").read_text()


def test_no_toolkit_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gsc.cbc, "cuda_home", lambda: None)
    # past the refusal comes the venv (a download of several GB): fail instead
    monkeypatch.setattr(gsc, "rehearse", lambda *a: pytest.fail("no refusal"))
    assert gsc.main(["--cache", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-stack-check: FAILED: no CUDA toolkit")
    assert not (tmp_path / "cache").exists()


# --- the build command is gpu_check's -------------------------------------------------------

def test_the_rehearsal_builds_with_gpu_checks_command(tmp_path, monkeypatch):
    assert Path(gsc.gpu_check.__file__).resolve() == ROOT / "benchmarks" / "gpu_check.py"
    calls = []
    monkeypatch.setattr(gsc, "prepare_venv", lambda *a: True)
    monkeypatch.setattr(gsc.cbc, "sync_copy", lambda dest, wanted: len(wanted))
    monkeypatch.setattr(gsc.Steps, "command",
                        lambda self, name, cmd, cwd, env: calls.append((name, cmd, cwd, env)))
    marker = ["sentinel-build"]
    monkeypatch.setattr(gsc.gpu_check, "build_command", lambda python: marker + [python])
    args = gsc.parse_args(["--arch", "8.6", "--jobs", "3", "--cache", str(tmp_path)])
    venv = str(tmp_path / "venv")
    assert gsc.rehearse(args, "/cuda", str(tmp_path), venv, False, 0.0) == 1   # build "failed"
    ((name, cmd, cwd, env),) = calls
    assert name == "build" and cmd == marker + [gsc.venv_python(venv)]
    assert cwd == str(tmp_path / "src")
    assert (env["TORCH_CUDA_ARCH_LIST"], env["CUDA_HOME"], env["MAX_JOBS"]) == \
        ("8.6", "/cuda", "3")
    assert env["PATH"].split(os.pathsep)[0] == os.path.join(venv, "bin")
    assert "PYTHONPATH" not in env


def test_gpu_checks_build_step_uses_the_shared_command():
    """The other half: gpu_check's step ``build`` runs build_command (its dry run reports
    the command it would run)."""
    class FakeRunner:
        python = "/some/python"
        notes = []

        def note(self, *a):
            self.notes.append(a)

        def run(self, *a, **k):
            return {"log": "x"}

        def log_text(self, rec):
            return ""

    r = FakeRunner()
    gsc.gpu_check.step_build(r, {}, True, {})
    detail = r.notes[0][3]
    assert detail.endswith(" ".join(gsc.gpu_check.build_command(r.python)[1:]))
    env = gsc.gpu_check.build_env("9.0", "/cuda", 5, base={"A": "1"})
    assert env == {"A": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "5",
                   "CUDA_HOME": "/cuda"}
    assert "CUDA_HOME" not in gsc.gpu_check.build_env("9.0", None, 5, base={})


# --- the venv -----------------------------------------------------------------------------

def fake_venv(path, exit_status):
    """A venv whose python records its arguments and exits with exit_status."""
    (path / "bin").mkdir(parents=True)
    python = path / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" > "{path}/args"\nexit {exit_status}\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return path


def test_venv_complete_needs_the_marker_and_the_probe(tmp_path):
    good = fake_venv(tmp_path / "good", 0)
    assert not gsc.venv_complete(str(good), "2.11.0")          # no marker
    (good / gsc.MARKER).write_text("torch==2.10.0\n")
    assert not gsc.venv_complete(str(good), "2.11.0")          # another torch
    (good / gsc.MARKER).write_text("torch==2.11.0\n")
    assert gsc.venv_complete(str(good), "2.11.0")
    assert (good / "args").read_text().strip() == "-c " + gsc.probe_code("2.11.0")
    bad = fake_venv(tmp_path / "bad", 1)
    (bad / gsc.MARKER).write_text("torch==2.11.0\n")
    assert not gsc.venv_complete(str(bad), "2.11.0")           # the probe fails
    assert not gsc.venv_complete(str(tmp_path / "absent"), "2.11.0")


def test_the_probe_asks_for_the_version_a_cuda_build_and_the_test_tools():
    code = gsc.probe_code("2.11.0")
    assert "'2.11.0'" in code and "torch.version.cuda" in code
    imported = re.match(r"import ([\w, ]+);", code).group(1).split(", ")
    assert {"torch", "triton", "pytest", "hypothesis", "numpy", "setuptools"} <= set(imported)


def test_a_given_venv_made_by_hand_is_used_and_a_broken_one_left_alone(tmp_path):
    args = gsc.parse_args(["--cache", str(tmp_path)])
    steps = gsc.Steps(str(tmp_path))
    by_hand = fake_venv(tmp_path / "by-hand", 0)                # no marker, probe passes
    assert gsc.prepare_venv(steps, args, str(tmp_path), str(by_hand), True)
    broken = fake_venv(tmp_path / "broken", 1)
    assert not gsc.prepare_venv(steps, args, str(tmp_path), str(broken), True)
    assert (broken / "bin" / "python").is_file()                # not deleted
    assert [rec["status"] for rec in steps.records] == ["ok", "FAILED"]


def test_summary_passes_only_when_every_step_ran_and_passed(tmp_path):
    steps = gsc.Steps(str(tmp_path))
    steps.note("venv", "ok", "reused")
    steps.note("pytest", "skipped", "--skip-tests")
    passed, lines = gsc.summary(steps, {"torch": "2.11.0+cu130"}, "/v", 1.0, "/l", True)
    assert passed and lines[-1].startswith("PASSED (pytest skipped)")
    assert "torch 2.11.0+cu130" in lines[0]
    steps.note("gpu_check dry run", "not run", "the build failed")
    passed, lines = gsc.summary(steps, {}, "/v", 1.0, "/l", True)
    assert not passed and lines[-1].startswith("FAILED")
