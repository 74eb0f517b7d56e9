"""User errors of the `dssn` command, run as a user runs it, in processes of their own:
exit status 2, exactly one line on stderr, no traceback, and nothing created or changed
(every file's bytes and mtime, and the folder listing, compared). Also the output lock
between two real processes, --version, top-level options after the command, and the
demo without scikit-learn.

Each `python -m dssn_kernels` costs seconds of CPU to import torch, so the many error
cases run in one subprocess that imports once and forks a child per case, which runs
`python -m dssn_kernels ARGS` as the interpreter does (runpy; an uncaught exception
prints its traceback and exits 1); some cases also run as a plain `python -m
dssn_kernels`, checked to say the same.
"""
import json
import os
import signal
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sklearn")

import dssn_kernels  # noqa: E402
from dssn_kernels.workflow import cli  # noqa: E402
from dssn_kernels.workflow.models import SmallCNN  # noqa: E402
from dssn_kernels.workflow.results import (COLUMN_LINE, OutputLock, header_line,  # noqa: E402
                                           lock_path, read_results)
from testkit import tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")


def env_without_launcher(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def dssn(args, cwd, env=None, module="dssn_kernels"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env or env_without_launcher())


# python -c FORK_RUNNER CASES_JSON OUT_DIR: {name: [args]} -> OUT_DIR/name.{out,err,code}
FORK_RUNNER = r"""
import json, os, runpy, sys, traceback
import dssn_kernels.workflow.analysis, dssn_kernels.workflow.certify_data  # noqa (shared imports)
import dssn_kernels.workflow.cli, dssn_kernels.workflow.trainer  # noqa
import sklearn.datasets, sklearn.model_selection  # noqa
cases, out = json.loads(sys.argv[1]), sys.argv[2]
for name, args in cases.items():
    pid = os.fork()
    if pid == 0:
        for fd, ext in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(out, f"{name}.{ext}"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.dup2(f, fd)
        sys.argv = ["dssn_kernels", *args]
        try:
            runpy.run_module("dssn_kernels", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out, f"{name}.code"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


def dssn_cases(cases, cwd, scratch):
    """{name: result with returncode, stdout, stderr} of ``python -m dssn_kernels ARGS``
    for each {name: ARGS}, every one in a process of its own (FORK_RUNNER)."""
    scratch.mkdir()
    r = subprocess.run([sys.executable, "-c", FORK_RUNNER, json.dumps(cases), str(scratch)],
                       cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=env_without_launcher())
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda name, ext: (scratch / f"{name}.{ext}").read_text()  # noqa: E731
    return {name: SimpleNamespace(returncode=int(read(name, "code")), stdout=read(name, "out"),
                                  stderr=read(name, "err")) for name in cases}


def snapshot(root):
    """Every file under ``root``: (bytes, mtime); and every folder."""
    files, folders = {}, set()
    for folder, dirs, names in os.walk(root):
        folders.add(os.path.relpath(folder, root))
        for name in names:
            p = os.path.join(folder, name)
            with open(p, "rb") as f:
                files[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
    return files, folders


def one_line_error(r, *patterns, absent=()):
    """'' when ``r`` is a clean refusal holding ``patterns``, else what is wrong."""
    lines = r.stderr.splitlines()
    if r.returncode != 2:
        return f"exit status {r.returncode}: {r.stderr[-2000:]}"
    if len(lines) != 1 or "Traceback" in r.stderr:
        return f"not one line: {r.stderr[-2000:]}"
    missing = [p for p in patterns if p not in lines[0]]
    present = [p for p in absent if p in lines[0]]
    return f"{lines[0]!r} lacks {missing} or has {present}" if missing or present else ""


@pytest.fixture
def workdir(tmp_path):
    """A folder with a checkpoint, result files (good, empty, torn), non-checkpoints."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    assert cli.main(["certify", str(ckpt), "--out", str(tmp_path / "r.tsv"), "--max", "4",
                     "--no-progress"]) == 0
    text = (tmp_path / "r.tsv").read_text()
    header = text.splitlines(keepends=True)[0]
    for name in ("skip.tsv", "max.tsv", "torn2-resume.tsv"):
        (tmp_path / name).write_text(text)
    (tmp_path / "empty.tsv").write_text(header + COLUMN_LINE + "\n")
    for name, key, value in (("badq.tsv", "q", 0), ("badsigma.tsv", "sigma", "x")):
        meta = json.loads(header[len("# dssn-results/1 "):])
        meta["spec"][key] = value        # a header spec analyze would divide by, or fail on
        (tmp_path / name).write_text(header_line(meta) + text.split("\n", 1)[1])
    (tmp_path / "torn1.tsv").write_text(header[:40])                  # a torn header
    (tmp_path / "torn1-resume.tsv").write_text(header[:40])
    (tmp_path / "torn2.tsv").write_text(header + COLUMN_LINE[:8])      # a torn column line
    (tmp_path / "afile").write_text("a file, not a folder\n")
    (tmp_path / "random.pt").write_bytes(os.urandom(300))
    (tmp_path / "text.pt").write_text("hello, I am text\n")
    torch.save(SmallCNN(), tmp_path / "module.pt")                     # a whole pickled model
    bad_checkpoints(ckpt, tmp_path)
    return tmp_path


def bad_checkpoints(ckpt, folder):
    """Checkpoints that load but do not fit their spec: NaN weights, a model of 5 classes
    or of 16x16 images, a malformed dataset entry or state_dict; and one whose model
    gives finite logits on a blank image but NaN on every noised digit (later.pt)."""
    from dssn_kernels.workflow.checkpoint import build_model

    base = torch.load(ckpt, weights_only=True)

    def variant(name, change):
        c = torch.load(ckpt, weights_only=True)
        change(c)
        torch.save(c, folder / name)

    def other_model(**kw):
        def change(c):
            c["model"]["kwargs"].update(kw)
            c["state_dict"] = build_model("small_cnn", c["model"]["kwargs"]).state_dict()
        return change

    def nan_weights(c):
        for v in c["state_dict"].values():
            v.fill_(float("nan"))

    def nan_later(c):   # blank image: finite; any pixel > 0: inf activations, NaN logits
        sd = c["state_dict"]
        sd["features.0.weight"].zero_()
        sd["features.0.weight"][:, :, 1, 1] = 1e38
        sd["features.0.bias"].fill_(1e38)
        sd["features.3.weight"].fill_(1e38)

    variant("nan.pt", nan_weights)
    variant("k5.pt", other_model(num_classes=5))
    variant("img16.pt", other_model(image_size=16))
    variant("dslist.pt", lambda c: c.update(dataset=["digits"]))
    variant("sdlist.pt", lambda c: c.update(state_dict=list(base["state_dict"].values())))
    variant("later.pt", nan_later)


CASES = {
    # --out: parent a file, empty; for each command that writes
    "certify-out-parent-file": (["certify", "m.pt", "--out", "afile/x.tsv"],
                                ["--out afile/x.tsv", "afile is a file, not a folder"]),
    "certify-out-empty": (["certify", "m.pt", "--out", ""], ["--out is empty"]),
    "train-out-parent-file": (["train", "--sigma", "0.5", "--out", "afile/m.pt"],
                              ["afile is a file, not a folder"]),
    "train-out-empty": (["train", "--sigma", "0.5", "--out", ""], ["--out is empty"]),
    # a training that diverges writes nothing (its NaN checkpoint would be refused later)
    "train-diverges": (["train", "--sigma", "0.5", "--optimizer", "sgd", "--lr", "1e30",
                        "--epochs", "1", "--batch-size", "8", "--max-train", "64",
                        "--no-progress", "--out", "new.pt"],
                       ["the training diverged in epoch 1: the model's", "lower --lr"]),
    "denoiser-step-overflows": (["train-denoiser", "m.pt", "--objective", "mse", "--lr", "1e38",
                                 "--epochs", "1", "--batch-size", "8", "--max-train", "64",
                                 "--no-progress", "--out", "d.pt"],
                                ["the training diverged in epoch 1: the optimizer step "
                                 "overflowed"]),
    # an option that does not apply is refused, never ignored
    "train-digits-data-root": (["train", "--sigma", "0.5", "--data-root", "somewhere",
                                "--out", "new.pt"],
                               ["--data-root somewhere applies to cifar10 and imagenet"]),
    "certify-digits-data-root": (["certify", "m.pt", "--data-root", "somewhere",
                                  "--out", "new.tsv"],
                                 ["--data-root somewhere applies to cifar10 and imagenet"]),
    "train-out-exists": (["train", "--sigma", "0.5", "--out", "m.pt"], ["m.pt exists", "--overwrite"]),
    # refused after the lock is taken (its folders made): the folders go again
    "train-new-folders": (["train", "--out", "new/sub/m.pt"], ["give the noise level"]),
    "denoiser-init-missing": (["train-denoiser", "m.pt", "--objective", "stability", "--init",
                               "nope.pt", "--out", "new/d.pt", "--no-progress"],
                              ["--init: no checkpoint file nope.pt"]),
    "denoiser-init-not-denoiser": (["train-denoiser", "m.pt", "--objective", "stability",
                                    "--init", "m.pt", "--out", "d.pt", "--no-progress"],
                                   ["--init m.pt is not a denoiser checkpoint", "small_cnn"]),
    "analyze-out-parent-file": (["analyze", "r.tsv", "--out", "afile/t.md"], ["afile is a file"]),
    "analyze-out-is-input": (["analyze", "x=r.tsv", "--out", "./r.tsv"],
                             ["--out ./r.tsv is one of the result files"]),
    "analyze-out-checkpoint": (["analyze", "r.tsv", "--out", "m.pt"],
                               ["--out m.pt exists and holds binary data", "not a table"]),
    "analyze-out-result-file": (["analyze", "r.tsv", "--out", "skip.tsv"],
                                ["--out skip.tsv exists and is a dssn result file"]),
    "plot-out-parent-file": (["plot", "curves", "r.tsv", "--out", "afile/c.png"], ["afile is a file"]),
    "plot-out-folder": (["plot", "noise", "--out", "."], ["is a folder"]),
    # options out of range
    "analyze-decimals": (["analyze", "r.tsv", "--decimals", "-2"], ["--decimals", ">= 0", "-2"]),
    "analyze-radius-nan": (["analyze", "r.tsv", "--radii", "0.5", "nan"],
                           ["--radii", "must be a finite radius >= 0, got nan"]),
    "analyze-radius-negative": (["analyze", "r.tsv", "--radii", "-1"],
                                ["--radii", "must be a finite radius >= 0, got -1"]),
    "train-workers": (["train", "--sigma", "0.5", "--out", "new.pt", "--workers", "-1"],
                      ["--workers", ">= 0", "-1"]),
    "plot-format": (["plot", "curves", "r.tsv", "--out", "c.txt"],
                    ["unsupported image format .txt", ".png", ".pdf", ".svg"]),
    "max-negative": (["certify", "m.pt", "--out", "new.tsv", "--max", "-5"], ["--max", "-1 for all"]),
    "max-zero": (["certify", "m.pt", "--out", "new.tsv", "--max", "0"], ["no images selected"]),
    "threads-after-command": (["analyze", "r.tsv", "--threads", "0"], ["--threads", ">= 1"]),
    "no-command": ([], ["required"]),
    # not checkpoints
    "ckpt-random-bytes": (["certify", "random.pt", "--out", "new.tsv"],
                          ["random.pt is not a loadable dssn checkpoint"]),
    "ckpt-text": (["certify", "text.pt", "--out", "new.tsv"], ["text.pt is not a loadable dssn checkpoint"]),
    "ckpt-pickled-module": (["certify", "module.pt", "--out", "new.tsv"],
                            ["module.pt is not a loadable dssn checkpoint", "SmallCNN"]),
    # result files: no rows, torn header or column line, another selection
    "plot-no-rows": (["plot", "curves", "empty.tsv", "--out", "c.png"], ["no certified images", "empty.tsv"]),
    "analyze-torn-header": (["analyze", "torn1.tsv"], ["line 1, the header, is incomplete", "--overwrite"]),
    "certify-torn-header": (["certify", "m.pt", "--out", "torn1-resume.tsv"],
                            ["line 1, the header, is incomplete", "--overwrite"]),
    "analyze-torn-columns": (["analyze", "torn2.tsv"], ["line 2, the column line, is incomplete",
                                                        "--overwrite"]),
    "another-skip": (["certify", "m.pt", "--out", "skip.tsv", "--max", "4", "--skip", "2"],
                     ["another selection", "--skip 1 --max 4"]),
    "smaller-max": (["certify", "m.pt", "--out", "max.tsv", "--max", "2"],
                    ["another selection", "--skip 1 --max 4"]),
    # an output that is one of the run's inputs, --overwrite or not
    "certify-out-is-checkpoint": (["certify", "m.pt", "--out", "m.pt", "--overwrite"],
                                  ["--out m.pt is the checkpoint"]),
    "denoiser-out-is-classifier": (["train-denoiser", "m.pt", "--objective", "mse", "--out",
                                    "./m.pt", "--overwrite", "--no-progress"],
                                   ["--out ./m.pt is the classifier checkpoint"]),
    "denoiser-out-is-init": (["train-denoiser", "m.pt", "--objective", "stability", "--init",
                              "random.pt", "--out", "random.pt", "--overwrite", "--no-progress"],
                             ["--out random.pt is the --init checkpoint"]),
    # checkpoints whose model does not fit the spec, malformed entries
    "ckpt-nan-weights": (["certify", "nan.pt", "--out", "new.tsv"],
                         ["small_cnn model returns NaN logits"]),
    "ckpt-other-classes": (["certify", "k5.pt", "--out", "new.tsv"],
                           ["does not fit its smoothing spec", "K=5 logits", "expected 10"]),
    "ckpt-other-images": (["certify", "img16.pt", "--out", "new.tsv"],
                          ["does not fit its smoothing spec", "images [1, 8, 8]"]),
    "ckpt-dataset-list": (["certify", "dslist.pt", "--out", "new.tsv"],
                          ["dslist.pt: malformed dataset entry"]),
    "ckpt-state-dict-list": (["certify", "sdlist.pt", "--out", "new.tsv"],
                             ["sdlist.pt: malformed state_dict"]),
    "ckpt-nan-later": (["certify", "later.pt", "--out", "new/sub/r.tsv"],   # folders go again
                       ["certifying images 0..", "NaN logits",
                        "nothing was written to new/sub/r.tsv"]),
    "ckpt-nan-later-mc": (["certify", "later.pt", "--out", "new.tsv", "--method", "ssn", "--n",
                           "20", "--n0", "4"], ["certifying images 0..0", "NaN logits"]),
    "denoiser-nan-classifier": (["train-denoiser", "nan.pt", "--objective", "mse", "--out",
                                 "new.pt", "--no-progress"], ["returns NaN logits"]),
    "denoiser-other-images": (["train-denoiser", "img16.pt", "--objective", "mse", "--out",
                               "new.pt", "--no-progress"], ["does not fit its smoothing spec"]),
    # learning rates
    "train-lr-nan": (["train", "--sigma", "0.5", "--lr", "nan", "--out", "new.pt"],
                     ["a finite lr > 0", "nan"]),
    "train-lr-inf": (["train", "--sigma", "0.5", "--lr", "inf", "--out", "new.pt"],
                     ["a finite lr > 0", "inf"]),
    "denoiser-lr-nan": (["train-denoiser", "m.pt", "--objective", "mse", "--lr", "nan", "--out",
                         "new.pt", "--no-progress"], ["finite lr and retrain lr > 0"]),
    "denoiser-retrain-lr-inf": (["train-denoiser", "m.pt", "--objective", "mse-retrain",
                                 "--retrain-lr", "inf", "--out", "new.pt", "--no-progress"],
                                ["finite lr and retrain lr > 0"]),
    # options that apply only with another: refused, not ignored
    "certify-noise-seed-dssn": (["certify", "m.pt", "--out", "new.tsv", "--noise-seed", "3"],
                                ["--noise-seed applies to the Monte Carlo methods"]),
    "train-stability-weight-alone": (["train", "--sigma", "0.5", "--stability-weight", "2",
                                      "--out", "new.pt"],
                                     ["--stability-weight applies to --stability training only"]),
    "train-stability-clean": (["train", "--sigma", "0.5", "--stability", "--noise", "none",
                               "--out", "new/m.pt"], ["needs a training noise, not --noise none"]),
    "denoiser-retrain-epochs-mse": (["train-denoiser", "m.pt", "--objective", "mse",
                                     "--retrain-epochs", "3", "--out", "new.pt", "--no-progress"],
                                    ["--retrain-epochs applies to --objective mse-retrain only"]),
    # a result file whose header spec is not numbers of their range
    "analyze-header-q0": (["analyze", "badq.tsv"],
                          ["badq.tsv is corrupt: line 1, the header, has spec.q = 0"]),
    "plot-header-sigma": (["plot", "curves", "badsigma.tsv", "--out", "c.png"],
                          ['has spec.sigma = "x", not a positive number']),
    # result arguments: an empty path, the current folder
    "analyze-label-no-path": (["analyze", "a="], ["a=: no file after a="]),
    "analyze-empty-path": (["analyze", ""], ["an empty file name"]),
    "analyze-dot": (["analyze", "."], [". (", "): not a result folder"]),
}
NEVER = ("Traceback", "weights_only", "add_safe_globals", "merge-tmp", ".tmp", ".probe")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the case runner forks")
def test_user_errors_are_one_line_and_change_nothing(workdir, tmp_path_factory):
    cases = {name: args + (["--no-progress"] if args[:1] in (["certify"], ["train"]) else [])
             for name, (args, _) in CASES.items()}
    patterns = {name: pats for name, (_, pats) in CASES.items()}
    # an output folder nobody may write: mode 555, or for root (who writes anyway) /proc
    ro = "/proc" if ROOT else str(workdir / "ro")
    if ROOT and not os.path.isdir("/proc/self"):
        ro = None
    elif not ROOT:
        os.mkdir(ro)
        os.chmod(ro, 0o555)
    if ro is not None:
        for cmd, out in (("certify", "x.tsv"), ("train", "m.pt"), ("analyze", "t.md")):
            args = {"certify": ["certify", "m.pt", "--no-progress"],
                    "train": ["train", "--sigma", "0.5", "--no-progress"],
                    "analyze": ["analyze", "r.tsv"]}[cmd]
            cases[f"unwritable-{cmd}"] = args + ["--out", f"{ro}/{out}"]
            patterns[f"unwritable-{cmd}"] = [f"{ro}/{out}"]
    # an output that is a pipe (outside `workdir`: snapshot() would block reading it): a
    # resume would block reading it, a rename would replace it
    pipes = None
    if hasattr(os, "mkfifo"):
        pipes = tmp_path_factory.mktemp("pipes")
        os.mkfifo(pipes / "fifo")
        for cmd, args in (("certify", ["certify", "m.pt", "--no-progress"]),
                          ("train", ["train", "--sigma", "0.5", "--no-progress"]),
                          ("analyze", ["analyze", "r.tsv"])):
            cases[f"fifo-{cmd}"] = args + ["--out", str(pipes / "fifo")]
            patterns[f"fifo-{cmd}"] = [f"--out {pipes / 'fifo'} is not a regular file"]
    # and what must work: --threads before or after the command, a missing output folder
    # (created), all writing outside the folder under test
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    ok = {"threads-before": ["--threads", "1", "analyze", "r.tsv"],
          "threads-after": ["analyze", "r.tsv", "--threads", "1"],
          "new-folders": ["certify", "m.pt", "--out", str(elsewhere / "new/sub/r.tsv"), "--max",
                          "3", "--no-progress", "--threads", "1"]}
    before = snapshot(workdir)
    try:
        results = dssn_cases({**cases, **ok}, workdir, tmp_path_factory.mktemp("runner") / "out")
    finally:
        if not ROOT:
            os.chmod(workdir / "ro", 0o755)
    problems = {name: one_line_error(results[name], *patterns[name], absent=NEVER)
                for name in cases}
    assert {k: v for k, v in problems.items() if v} == {}
    after = snapshot(workdir)
    assert after[1] == before[1], "folders created or removed"
    assert after[0].keys() == before[0].keys(), "files created or removed"
    changed = [name for name in before[0] if after[0][name] != before[0][name]]
    assert changed == []

    if pipes is not None:
        assert stat.S_ISFIFO(os.stat(pipes / "fifo").st_mode)
        assert os.listdir(pipes) == ["fifo"]
    assert all(results[k].returncode == 0 for k in ok), {k: results[k].stderr for k in ok}
    assert results["threads-before"].stdout == results["threads-after"].stdout
    assert "| r.tsv |" in results["threads-after"].stdout
    assert [row.idx for row in read_results(elsewhere / "new/sub/r.tsv").rows] == [0, 1, 2]

    # a plain `python -m dssn_kernels` says the same as the runner's child
    for name in ("ckpt-pickled-module", "threads-after-command"):
        r = dssn(cases[name], workdir)
        assert (r.returncode, r.stderr) == (results[name].returncode, results[name].stderr)
    assert snapshot(workdir) == after


def test_version_and_top_level_options_after_the_command(tmp_path):
    version = f"dssn (dssn-kernels) {dssn_kernels.__version__}"
    r = dssn(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == version, r.stderr
    script = os.path.join(os.path.dirname(sys.executable), "dssn")   # the installed command
    if os.path.exists(script):
        r = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == version, r.stderr
    # top-level options after the command too (run: test_user_errors_...)
    assert cli.build_parser().parse_args(["plot", "curves", "r.tsv", "--out", "c.png",
                                          "--threads", "3"]).threads == 3
    assert cli.build_parser().parse_args(["--threads", "2", "bench"]).threads == 2


def test_demo_without_scikit_learn_says_what_the_cli_says(tmp_path):
    fake = tmp_path / "fake" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sklearn'\", name='sklearn')\n")
    env = env_without_launcher(PYTHONPATH=str(tmp_path / "fake"))
    demo = dssn(["--quick", "--out", "runs"], tmp_path, env=env, module="dssn_kernels.workflow.demo")
    train = dssn(["train", "--sigma", "0.5", "--out", "m.pt"], tmp_path, env=env)
    hint = "the digits data set needs scikit-learn: pip install 'dssn-kernels[demo]'"
    assert one_line_error(demo, hint) == "" and one_line_error(train, hint) == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]


HOLDER = """
import sys
from dssn_kernels.workflow.results import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()          # hold the lock until the test closes stdin (or kills us)
lock.release()
"""


def test_a_second_certify_on_a_locked_output_fails_at_once(workdir):
    out = workdir / "r.tsv"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env_without_launcher())
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(workdir)
        r = dssn(["certify", "m.pt", "--out", "r.tsv", "--max", "8", "--no-progress"], workdir)
        assert one_line_error(r, "r.tsv is in use", f"pid {holder.pid} on", "since") == ""
        assert snapshot(workdir) == before
        # the holder dies without releasing (kill -9): its lock file stays, but the OS has
        # dropped the lock, so the next run takes it over and resumes
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert lock_path(out).exists()
        r = dssn(["certify", "m.pt", "--out", "r.tsv", "--max", "8", "--no-progress"], workdir)
        assert r.returncode == 0 and "certified 4 images" in r.stdout, r.stderr
        assert not lock_path(out).exists()
        assert [row.idx for row in read_results(out).rows] == list(range(8))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)


def test_a_training_on_a_locked_output_fails_at_once(workdir, tmp_path_factory):
    """`dssn train` and `dssn train-denoiser` hold OUT.lock as certify does, taken before
    they look at the output or its state file: with the lock held by another process (the
    test), each refuses at once in one line naming the holder, --overwrite and --resume
    included, and nothing is created, removed or changed."""
    for name in ("t.pt", "s.pt.train-state"):   # the other run's output, and a state file
        (workdir / name).write_bytes(f"{name} of the other run\n".encode())
    held = [OutputLock(workdir / name, what="the holder").acquire()
            for name in ("new.pt", "t.pt", "s.pt")]
    tiny = ["--sigma", "0.5", "--epochs", "1", "--max-train", "32", "--no-progress",
            "--device", "cpu"]
    den = ["train-denoiser", "m.pt", "--objective", "mse", "--depth", "3", "--width", "4"] + tiny
    cases = {"train": (["train", "--out", "new.pt"] + tiny, "new.pt"),
             "train-overwrite": (["train", "--out", "t.pt", "--overwrite"] + tiny, "t.pt"),
             "train-resume": (["train", "--out", "s.pt", "--resume"] + tiny, "s.pt"),
             "denoiser": (den + ["--out", "new.pt"], "new.pt"),
             "denoiser-overwrite": (den + ["--out", "t.pt", "--overwrite"], "t.pt"),
             "denoiser-resume": (den + ["--out", "s.pt", "--resume"], "s.pt")}
    try:
        before = snapshot(workdir)
        results = dssn_cases({k: args for k, (args, _) in cases.items()}, workdir,
                             tmp_path_factory.mktemp("runner") / "out")
        assert snapshot(workdir) == before
    finally:
        for lock in held:
            lock.release()
    problems = {k: one_line_error(results[k], f"{out} is in use",
                                  f"the holder (pid {os.getpid()} on", "since", absent=NEVER)
                for k, (_, out) in cases.items()}
    assert {k: v for k, v in problems.items() if v} == {}


@pytest.mark.parametrize("module, args, pattern", [
    ("demo", ["--quick", "--sigmas", "0.01"], "argument --sigmas: sigma=0.01 gives L = "),
    ("compare_demo", ["--quick", "--n", "0"], "argument --n: must be >= 1, got 0"),
    ("compare_demo", ["--mc-images", "-3"], "argument --mc-images: must be >= 1, got -3"),
    ("compare_demo", ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    ("denoise_demo", ["--sigmas", "0.5", "nan"], "argument --sigmas: sigma must be a positive"),
])
def test_demo_options_are_refused_in_one_line_before_any_work(module, args, pattern, capsys):
    """A demo's bad option: one line and exit status 2 from its parser, before any training
    (a sigma of no variant was a traceback; a zero --n, --epochs, ... silently the default;
    a negative --mc-images a refusal of --max after the training)."""
    import importlib

    demo = importlib.import_module(f"dssn_kernels.workflow.{module}")
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and pattern in err, err


def test_a_damaged_imagenet_image_is_one_line(tmp_path, capsys):
    """An ImageNet folder with a file that is not a picture (or a truncated one): one
    line naming the file, no PIL traceback, nothing written."""
    pytest.importorskip("PIL")
    from testkit import run_cli

    cls = tmp_path / "in" / "val" / "n01"
    cls.mkdir(parents=True)
    (cls / "a.JPEG").write_text("not a picture\n")
    out = tmp_path / "noise.png"
    code, _, err = run_cli(["plot", "noise", "--dataset", "imagenet", "--data-root",
                            str(tmp_path / "in"), "--indices", "0", "--out", str(out)], capsys)
    assert one_line_error(SimpleNamespace(returncode=code, stderr=err),
                          f"cannot read image {cls / 'a.JPEG'}") == ""
    assert not out.exists()


def test_a_damaged_imagenet_image_read_by_a_loader_worker_is_one_line(tmp_path, capsys):
    """With --workers, the error comes back from a DataLoader worker, its traceback in the
    message: still the one line naming the file, nothing written."""
    pytest.importorskip("PIL")
    from testkit import run_cli

    cls = tmp_path / "in" / "train" / "n01"
    cls.mkdir(parents=True)
    (cls / "a.JPEG").write_text("not a picture\n")
    out = tmp_path / "m.pt"
    code, _, err = run_cli(["train", "--dataset", "imagenet", "--data-root",
                            str(tmp_path / "in"), "--sigma", "0.5", "--workers", "1",
                            "--epochs", "1", "--no-progress", "--device", "cpu",
                            "--out", str(out)], capsys)
    assert one_line_error(SimpleNamespace(returncode=code, stderr=err),
                          f"cannot read image {cls / 'a.JPEG'}") == ""
    assert "Traceback" not in err and "worker" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_refused_first_batch_says_what_the_file_holds(workdir, capsys):
    """NaN logits in the first batch of certify --overwrite over an existing file: the
    message says the file holds no rows (it was started again), not that rows are kept."""
    from testkit import run_cli

    out = workdir / "r.tsv"
    code, _, err = run_cli(["certify", str(workdir / "later.pt"), "--out", str(out),
                            "--overwrite", "--no-progress"], capsys)
    assert code == 2 and f"{out} holds no rows" in err and "kept" not in err, err
    assert not read_results(out).rows


def test_a_demo_terminated_by_sigterm_cleans_up_and_says_so(tmp_path, capsys):
    """run_demo (the demos' python -m entry) handles SIGTERM as the dssn command does: the
    interruption runs every cleanup (here a `finally`), one line, exit 143; the previous
    handler is back afterwards."""
    import signal

    from dssn_kernels.workflow.options import run_demo

    cleaned = []

    def main():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")   # pragma: no cover
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    assert run_demo(main, "demo") == 143 and cleaned == [True]
    assert capsys.readouterr().err == "python -m demo: error: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before
