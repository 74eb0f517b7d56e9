"""The ``dssn`` command end to end on digits (tiny budgets): train, certify (resume,
refusals), analyze (a hand-made known table), plot; data readers on fake folders."""
import pickle
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow import certify_data  # noqa: E402
from dssn_kernels.workflow import analysis  # noqa: E402
from dssn_kernels.workflow.data import load_dataset, resize_center_crop  # noqa: E402
from dssn_kernels.workflow.results import (COLUMN_LINE, MARGIN_COLUMN_LINE,  # noqa: E402
                                  expected_certificate, format_row, header_line, read_results)
from testkit import assert_refused, interrupted_on_call, rows_without_time, tiny_checkpoint  # noqa: E402
from testkit import run_cli as run  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_process")


def test_entry_points():
    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "dssn"]
    assert eps and eps[0].value == "dssn_kernels.workflow.cli:main"
    r = subprocess.run([sys.executable, "-m", "dssn_kernels", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "certify" in r.stdout and "analyze" in r.stdout


def test_cli_workflow_end_to_end(tmp_path, capsys):
    ckpt, tsv = tmp_path / "m.pt", tmp_path / "r.tsv"
    code, out, err = run(["train", "--sigma", "0.5", "--out", str(ckpt), "--epochs", "1",
                          "--max-train", "128", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "sigma=0.5 (L=27, q=16, seed=0)" in out and ckpt.exists()
    raw = torch.load(ckpt, weights_only=True)
    assert raw["spec"]["L"] == 27 and raw["dataset"]["name"] == "digits"
    assert raw["training"]["epochs"] == 1 and raw["training"]["num_train"] == 128

    code, out, err = run(["certify", str(ckpt), "--out", str(tsv), "--max", "20", "--skip", "2",
                          "--no-progress", "--sigma", "0.5", "--q", "16"], capsys)
    assert code == 0, err
    lines = tsv.read_text().splitlines()
    assert lines[0].startswith("# dssn-results/1 {") and lines[1] == COLUMN_LINE
    assert lines[1].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "counts"]
    rf = read_results(tsv)
    assert [r.idx for r in rf.rows] == list(range(0, 20, 2))
    assert all(sum(r.counts) == 27 for r in rf.rows)
    labels = load_dataset("digits", "test").labels
    assert all(r.label == int(labels[r.idx]) for r in rf.rows)
    # a rerun with a larger --max only certifies the new indices
    code, out, err = run(["certify", str(ckpt), "--out", str(tsv), "--max", "24",
                          "--skip", "2", "--no-progress"], capsys)
    assert code == 0 and "certified 2 images" in out
    assert "selection of images grows from --skip 2 --max 20: 10 images to --skip 2 --max 24" in err
    assert [r.idx for r in read_results(tsv).rows] == list(range(0, 24, 2))
    assert read_results(tsv).meta["selection"] == {"skip": 2, "max": 24}   # the header follows

    code, out, err = run(["analyze", str(tsv), "--radii", "0.25", "0.5"], capsys)
    assert code == 0 and "| r.tsv | 0.5 | 27 | 16 | 12 |" in out and "ρ = 0.25" in out
    pytest.importorskip("matplotlib")
    code, out, err = run(["plot", "curves", str(tsv), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 1000
    code, out, err = run(["plot", "noise", "--sigma", "1", "--indices", "0", "5",
                          "--out", str(tmp_path / "n.png")], capsys)
    assert code == 0 and (tmp_path / "n.png").stat().st_size > 1000


def test_resume_after_interruption_gives_the_same_file(tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    common = ["--max", "40", "--images-per-batch", "4", "--no-progress"]
    assert run(["certify", str(ckpt), "--out", str(full)] + common, capsys)[0] == 0

    real = certify_data.certify
    monkeypatch.setattr(certify_data, "certify", interrupted_on_call(real, 3))   # third batch
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + common, capsys)
    assert code == 130 and "rerun the same command to resume" in err
    assert len(read_results(part).rows) == 8           # two whole batches were saved
    monkeypatch.setattr(certify_data, "certify", real)
    # a crash in the middle of a write leaves a torn last line: dropped on resume
    with open(part, "a") as f:
        f.write("8\t3\t3\t0.1")
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + common, capsys)
    assert code == 0 and "incomplete last line" in err and "certified 32 images" in out
    assert rows_without_time(part) == rows_without_time(full)
    # nothing left to do: a rerun certifies nothing and changes nothing
    before = part.read_bytes()
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + common, capsys)
    assert code == 0 and "certified 0 images" in out and part.read_bytes() == before


def test_sigterm_is_an_interruption_that_resumes(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's preemption) mid-run is handled like Ctrl-C: one line, exit
    143, the lock released, the rows whole; the same command resumes to the rows of an
    uninterrupted run. The handler is the CLI's only while a command runs."""
    import os
    import signal

    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    common = ["--max", "40", "--images-per-batch", "4", "--no-progress"]
    assert run(["certify", str(ckpt), "--out", str(full)] + common, capsys)[0] == 0
    real, calls = certify_data.certify, {"n": 0}

    def terminated_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # delivered to this (the main) thread
        return real(*a, **kw)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(certify_data, "certify", terminated_on_third)
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + common, capsys)
    assert code == 143 and "terminated (SIGTERM); rerun the same command to resume" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.tsv", "m.pt", "part.tsv"]
    assert len(read_results(part).rows) == 8           # two whole batches were saved
    monkeypatch.setattr(certify_data, "certify", real)
    assert run(["certify", str(ckpt), "--out", str(part)] + common, capsys)[0] == 0
    assert rows_without_time(part) == rows_without_time(full)


def test_refusals_leave_files_untouched(tmp_path, capsys):
    a = tiny_checkpoint(tmp_path / "a.pt", init_seed=0)
    b = tiny_checkpoint(tmp_path / "b.pt", init_seed=1)
    tsv = tmp_path / "r.tsv"
    assert run(["certify", str(a), "--out", str(tsv), "--max", "6", "--no-progress"], capsys)[0] == 0
    before = tsv.read_bytes()

    def refused(argv, *patterns):
        code, out, err = run(argv, capsys)
        assert_refused(code, err, *patterns)
        assert tsv.read_bytes() == before

    # another checkpoint's output
    refused(["certify", str(b), "--out", str(tsv), "--max", "6"], "different run", "checkpoint_sha256")
    # another split
    refused(["certify", str(a), "--out", str(tsv), "--split", "train", "--max", "6"], "different run",
            "dataset.split")
    # a spec on the command line that disagrees with the checkpoint: both values named
    refused(["certify", str(a), "--out", str(tsv), "--sigma", "0.25"], "--sigma 0.25", "sigma=0.5")
    refused(["certify", str(a), "--out", str(tsv), "--q", "255"], "--q 255", "q=16")
    refused(["certify", str(a), "--out", str(tsv), "--seed", "1"], "--seed 1", "seed=0")
    # a corrupt row
    lines = before.decode().splitlines(keepends=True)
    cols = lines[3].split("\t")
    cols[6] = "1," + cols[6]
    tsv.write_text("".join(lines[:3] + ["\t".join(cols)] + lines[4:]))
    before = tsv.read_bytes()
    refused(["certify", str(a), "--out", str(tsv)], "corrupt", "line 4")
    # not a result file at all
    tsv.write_text("precious notes\n")
    before = tsv.read_bytes()
    refused(["certify", str(a), "--out", str(tsv)], "not a dssn result file")
    # --overwrite replaces it explicitly
    assert run(["certify", str(a), "--out", str(tsv), "--max", "3", "--overwrite",
                "--no-progress"], capsys)[0] == 0
    assert [r.idx for r in read_results(tsv).rows] == [0, 1, 2]
    before = tsv.read_bytes()
    # a bad checkpoint, a missing file, a bad spec at training
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    refused(["certify", str(tmp_path / "junk.pt"), "--out", str(tsv)], "not a loadable")
    refused(["certify", str(tmp_path / "none.pt"), "--out", str(tsv)], "no checkpoint file")
    refused(["train", "--sigma", "-1", "--out", str(tmp_path / "x.pt")], "sigma")
    refused(["train", "--sigma", "0.5", "--q", "255", "--out", str(tmp_path / "x.pt")], "q=16")
    refused(["analyze", str(tmp_path / "none.tsv")], "none.tsv")


def hand_made(path, sigma, L, rows, q=16, num_classes=3):
    spec = {"sigma": sigma, "q": q, "seed": 0, "L": L, "input_shape": [1, 8, 8],
            "num_classes": num_classes}
    meta = {"checkpoint_sha256": "0" * 64, "spec": spec, "dataset": {"name": "digits", "split": "test"}}
    text = header_line(meta) + COLUMN_LINE + "\n"
    for idx, label, counts in rows:
        pred, radius = expected_certificate(counts, q)
        text += format_row(idx, label, pred, radius, 0.01, counts)
    path.write_text(text)
    return path


def test_analyze_hand_made_files_gives_the_known_table(tmp_path, capsys):
    # sigma 0.25 (L=13): radii 6/16, 6/16, 3/16 (wrong), 0 -> clean 75%
    a = hand_made(tmp_path / "a.tsv", 0.25, 13,
                  [(0, 0, [13, 0, 0]), (1, 1, [0, 13, 0]), (2, 2, [3, 10, 0]), (3, 0, [7, 6, 0])])
    # sigma 0.5 (L=27): radii 13/16, 3/16, 13/16, 13/16 (wrong) -> clean 75%
    b = hand_made(tmp_path / "b.tsv", 0.5, 27,
                  [(0, 0, [27, 0, 0]), (1, 1, [10, 17, 0]), (2, 2, [0, 0, 27]), (3, 0, [0, 27, 0])])
    code, out, err = run(["analyze", str(a), str(b), "--radii", "0.1875", "0.375", "0.5", "1"],
                         capsys)
    assert code == 0, err
    assert "| a.tsv | 0.25 | 13 | 16 | 4 | 75.0% | 50.0% | 50.0% | 0.0% | 0.0% |" in out
    assert "| b.tsv | 0.5 | 27 | 16 | 4 | 75.0% | 75.0% | 50.0% | 50.0% | 0.0% |" in out
    # Table 1 layout: best over sigma (ties: higher clean accuracy, then smaller sigma)
    assert ("| DSSN | 75.0% (75.0% @ σ=0.5) | 50.0% (75.0% @ σ=0.25) | 50.0% (75.0% @ σ=0.5) "
            "| 0.0% (75.0% @ σ=0.25) |") in out
    # LABEL=FILE groups rows
    code, out, err = run(["analyze", f"first={a}", f"second={b}", "--radii", "0.5",
                          "--decimals", "2", "--out", str(tmp_path / "t.md")], capsys)
    assert "| first | 0.00% (75.00% @ σ=0.25) |" in out
    assert "| second | 50.00% (75.00% @ σ=0.5) |" in out
    assert "| second |" in (tmp_path / "t.md").read_text()
    # defaults: Table 1's radii for q = 255
    c = hand_made(tmp_path / "c.tsv", 0.25, 220, [(0, 0, [220, 0, 0])], q=255)
    code, out, err = run(["analyze", str(c)], capsys)
    assert "| | ρ = 0.5 | ρ = 1 | ρ = 1.5 | ρ = 2 | ρ = 2.5 | ρ = 3 | ρ = 3.5 | ρ = 4 |".replace(
        "| |", "|  |") in out
    assert "| c.tsv | 0.25 | 220 | 255 | 1 | 100.0% | 0.0% |" in out   # 110/255 < 0.5


@pytest.mark.parametrize("failure", ["disk full", "interrupted"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_analyze_out_is_never_half_written(tmp_path, capsys, monkeypatch, failure, existing):
    """--out goes through a temporary file and a rename (results.write_text_atomic): a
    write that fails half way (the disk full: a one-line error; an interruption: exit
    130) leaves the old table intact, or no file, and no temporary file."""
    import errno

    from dssn_kernels.workflow import results

    a = hand_made(tmp_path / "a.tsv", 0.25, 13, [(0, 0, [13, 0, 0]), (1, 1, [0, 13, 0])])
    folder = tmp_path / "tables"
    folder.mkdir()
    out = folder / "t.md"
    if existing:
        out.write_text("the old table\n")
    real_open = open

    class HalfWay:
        """A file whose write stops half way through the text and then fails."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise KeyboardInterrupt

    def half_way_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWay(f) if "w" in mode or "x" in mode else f

    monkeypatch.setattr(results, "open", half_way_open, raising=False)
    code, stdout, err = run(["analyze", str(a), "--radii", "0.5", "--out", str(out)], capsys)
    if failure == "disk full":
        assert code == 2 and err == (f"dssn analyze: error: cannot write {out}: "
                                     "No space left on device\n")
    else:
        assert code == 130 and "interrupted" in err
    assert "| a.tsv |" in stdout and "written to" not in stdout     # printed, not written
    assert sorted(p.name for p in folder.iterdir()) == (["t.md"] if existing else [])
    if existing:
        assert out.read_text() == "the old table\n"
    # without the failure the table replaces the old one
    monkeypatch.undo()
    code, stdout, err = run(["analyze", str(a), "--radii", "0.5", "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_text() + f"\nwritten to {out}\n" == stdout
    assert sorted(p.name for p in folder.iterdir()) == ["t.md"]


def test_analyze_never_mixes_data_sets_or_q_in_one_row(tmp_path, capsys):
    # the best-over-sigma row of unlabeled files: one per data set and q
    a = hand_made(tmp_path / "a.tsv", 0.25, 13, [(0, 0, [13, 0, 0]), (1, 1, [0, 13, 0])])
    b = hand_made(tmp_path / "b.tsv", 0.25, 220, [(0, 0, [220, 0, 0])], q=255)
    c = hand_made(tmp_path / "c.tsv", 0.5, 27, [(0, 1, [27, 0, 0])])
    c.write_text(c.read_text().replace('"name": "digits"', '"name": "cifar10"', 1))
    code, out, err = run(["analyze", str(a), str(b), str(c), "--radii", "0.25"], capsys)
    assert code == 0, err
    assert "| DSSN (digits, q=16) | 100.0% (100.0% @ σ=0.25) |" in out
    assert "| DSSN (digits, q=255) | 100.0% (100.0% @ σ=0.25) |" in out
    assert "| DSSN (cifar10, q=16) | 0.0% (0.0% @ σ=0.5) |" in out
    best = analysis.best_over_sigma(analysis.load_results([a, b, c]), [0.25])
    assert sorted(best) == ["DSSN (cifar10, q=16)", "DSSN (digits, q=16)", "DSSN (digits, q=255)"]
    # labels still group, and within one label data set and q still split the row
    code, out, err = run(["analyze", f"x={a}", f"x={b}", f"y={c}", "--radii", "0.25"], capsys)
    assert "| x (q=16) |" in out and "| x (q=255) |" in out and "| y |" in out


def test_certify_holds_the_output_lock_while_it_runs(tmp_path, capsys, monkeypatch):
    from dssn_kernels.workflow.results import OutputLock, ResultsError, lock_path

    ckpt, tsv = tiny_checkpoint(tmp_path / "m.pt"), tmp_path / "r.tsv"
    real, seen = certify_data.certify, []

    def certify_and_try_the_lock(*a, **kw):
        with pytest.raises(ResultsError, match="r.tsv is in use: dssn certify"):
            OutputLock(tsv).acquire()
        seen.append(lock_path(tsv).exists())
        return real(*a, **kw)

    monkeypatch.setattr(certify_data, "certify", certify_and_try_the_lock)
    assert run(["certify", str(ckpt), "--out", str(tsv), "--max", "4", "--no-progress"],
               capsys)[0] == 0
    assert seen == [True] and not lock_path(tsv).exists()


def test_certify_with_a_margin(tmp_path, capsys):
    # an untrained net whose top-2 logit gaps are ~0.09..0.2: margin 0.13 makes some
    # variants ambiguous (and may leave predictions uncertified)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    plain, zero, tsv = tmp_path / "plain.tsv", tmp_path / "zero.tsv", tmp_path / "m.tsv"
    common = ["--max", "12", "--images-per-batch", "4", "--no-progress"]
    assert run(["certify", str(ckpt), "--out", str(plain)] + common, capsys)[0] == 0
    # --margin 0 is no margin: the same file format and rows
    assert run(["certify", str(ckpt), "--out", str(zero), "--margin", "0"] + common, capsys)[0] == 0
    assert rows_without_time(zero) == rows_without_time(plain)
    assert '"margin"' not in zero.read_text().splitlines()[0]

    code, out, err = run(["certify", str(ckpt), "--out", str(tsv), "--margin", "0.13",
                          "--max", "8", "--images-per-batch", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert "margin 0.13:" in out and "not certified even at radius 0" in out
    lines = tsv.read_text().splitlines()
    assert '"margin": 0.13' in lines[0] and lines[1] == MARGIN_COLUMN_LINE
    assert lines[1].split("\t")[-2:] == ["num_ambiguous", "ambiguous"]
    # a rerun with the same margin resumes
    code, out, err = run(["certify", str(ckpt), "--out", str(tsv), "--margin", "0.13"] + common,
                         capsys)
    assert code == 0 and "certified 4 images" in out, err
    rf = read_results(tsv)                     # checks sum(counts) + num_ambiguous == L, radii
    assert rf.meta["margin"] == 0.13 and [r.idx for r in rf.rows] == list(range(12))
    assert all(sum(r.counts) + r.num_ambiguous == 27 for r in rf.rows)
    assert sum(r.num_ambiguous for r in rf.rows) > 0
    # against the same variants without a margin: a class keeps at most its plain votes
    # and loses only ambiguous ones; the prediction is certified no further
    for m, p in zip(rf.rows, read_results(plain).rows):
        assert m.idx == p.idx and m.label == p.label
        assert all(a <= b <= a + amb for a, b, amb in zip(m.counts, p.counts, m.ambiguous))
        assert m.radius <= p.radius and (m.radius >= 0 or m.radius == -1 / 16)
        assert m.radius < 0 or m.predict == p.predict

    # resuming with another margin (or none) is refused, and nothing is changed
    before = tsv.read_bytes()
    for margin, msg in ((["--margin", "0.1"], "--margin 0.13, this run uses --margin 0.1"),
                        ([], "--margin 0.13, this run uses --margin 0;")):
        code, out, err = run(["certify", str(ckpt), "--out", str(tsv)] + margin + common, capsys)
        assert code == 2 and msg in err and "\n" not in err.strip(), err
        assert tsv.read_bytes() == before
    # and a file without a margin refuses a run with one
    before = plain.read_bytes()
    code, out, err = run(["certify", str(ckpt), "--out", str(plain), "--margin", "0.13"] + common,
                         capsys)
    assert code == 2 and "--margin 0, this run uses --margin 0.13" in err
    assert plain.read_bytes() == before
    code, out, err = run(["certify", str(ckpt), "--out", str(tmp_path / "x.tsv"), "--margin", "-1"],
                         capsys)
    assert code == 2 and "margin" in err and not (tmp_path / "x.tsv").exists()

    code, out, err = run(["analyze", str(tsv), "--radii", "0", "0.25"], capsys)
    assert code == 0 and "m.tsv was certified with margin τ=0.13" in out, err


def test_analyze_counts_a_negative_radius_at_no_radius(tmp_path, capsys):
    # q = 16, L = 27, margin 0.1: image 1 is correct but not certified (radius -1/16)
    spec = {"sigma": 0.5, "q": 16, "seed": 0, "L": 27, "input_shape": [1, 8, 8], "num_classes": 3}
    meta = {"checkpoint_sha256": "0" * 64, "spec": spec, "margin": 0.1,
            "dataset": {"name": "digits", "split": "test"}}
    text = header_line(meta) + MARGIN_COLUMN_LINE + "\n"
    for idx, label, counts, amb in [(0, 0, [27, 0, 0], [0, 0, 0]), (1, 0, [10, 9, 0], [8, 8, 0]),
                                    (2, 1, [0, 17, 3], [0, 7, 7]), (3, 2, [20, 7, 0], [0, 0, 0])]:
        pred, radius = expected_certificate(counts, 16, amb)
        text += format_row(idx, label, pred, radius, 0.01, counts, num_ambiguous=27 - sum(counts),
                           ambiguous=amb)
    path = tmp_path / "m.tsv"
    path.write_text(text)
    res = analysis.load_result(path)
    assert list(res.radius) == [13 / 16, -1 / 16, 3 / 16, 6 / 16] and res.margin == 0.1
    assert res.clean_accuracy() == 0.75                  # image 1's prediction is correct
    assert res.certified_accuracy(0) == 0.5              # ... but not certified at radius 0
    assert res.certified_accuracy(-1) == 0.5             # nor at any radius
    r, acc = res.curve()
    assert list(r) == [0, 3 / 16, 13 / 16] and list(acc) == [0.5, 0.5, 0.25]
    code, out, err = run(["analyze", str(path), "--radii", "0", "0.1875", "0.5"], capsys)
    assert code == 0, err
    assert "| m.tsv | 0.5 | 27 | 16 | 4 | 75.0% | 50.0% | 50.0% | 25.0% |" in out
    assert "1 of 4 predictions are not certified even at radius 0" in out


def test_cifar10_reader_and_training_on_a_fake_folder(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = list(rng.randint(0, 10, size=n))
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    ds = load_dataset("cifar10", "test", tmp_path)
    assert len(ds) == 3 and ds.q == 255 and ds.input_shape == (3, 32, 32)
    x, y = ds.get([2])
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 32, 32)
    assert np.array_equal(x[0].numpy().reshape(-1), batches["test_batch"][0][2])
    assert int(y[0]) == batches["test_batch"][1][2]
    assert len(load_dataset("cifar10", "train", folder)) == 10
    # train (WRN-40-2, a few images) and certify at a tiny sigma (L = 8) through the CLI
    ckpt, tsv = tmp_path / "w.pt", tmp_path / "w.tsv"
    code, out, err = run(["train", "--dataset", "cifar10", "--data-root", str(tmp_path),
                          "--sigma", "0.01", "--epochs", "1", "--max-train", "4",
                          "--no-progress", "--device", "cpu", "--out", str(ckpt)], capsys)
    assert code == 0, err
    assert torch.load(ckpt, weights_only=True)["model"]["arch"] == "wrn40_2"
    code, out, err = run(["certify", str(ckpt), "--data-root", str(tmp_path), "--out", str(tsv),
                          "--max", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert [sum(r.counts) for r in read_results(tsv).rows] == [8, 8]
    code, out, err = run(["certify", str(ckpt), "--out", str(tsv)], capsys)
    assert code == 2 and "--data-root" in err
    (folder / "test_batch").write_bytes(b"garbage")
    code, out, err = run(["certify", str(ckpt), "--data-root", str(tmp_path), "--out", str(tsv)],
                         capsys)
    assert code == 2 and "test_batch" in err


def test_imagenet_folder_reader(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.RandomState(0)
    sizes = {"n01/a.png": (300, 260), "n01/b.JPEG": (256, 256), "n02/c.png": (224, 500)}
    arrays = {}
    for name, (w, h) in sizes.items():
        p = tmp_path / "val" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        Image.fromarray(arr).save(p, format="PNG")
        arrays[name] = arr
    ds = load_dataset("imagenet", "test", tmp_path)
    assert len(ds) == 3 and ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 1]
    x, _ = ds.get([1, 2])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.uint8
    # 256x256: no resize, the center 224x224 crop
    assert np.array_equal(x[0].numpy().transpose(1, 2, 0), arrays["n01/b.JPEG"][16:240, 16:240])
    # shorter side 224 -> 256 first, then the crop
    img = Image.fromarray(arrays["n02/c.png"])
    direct = resize_center_crop(img)
    resized = np.asarray(img.resize((256, int(256 * 500 / 224)), Image.BILINEAR))
    top = int(round((resized.shape[0] - 224) / 2))
    assert np.array_equal(direct.numpy().transpose(1, 2, 0), resized[top:top + 224, 16:240])


def test_analyze_out_never_touches_a_file_named_like_a_temporary(tmp_path, capsys):
    """The temporary file of --out is a new, unique one: an input named OUT.tmp (the name a
    fixed temporary would take) or OUT.merge-tmp is read, kept and never overwritten."""
    out = tmp_path / "t.md"
    inputs = []
    for suffix in (".tmp", ".merge-tmp"):
        path = tmp_path / f"t.md{suffix}"
        hand_made(path, 0.25, 13, [(0, 0, [13, 0, 0]), (1, 1, [0, 13, 0])])
        inputs.append((path, path.read_bytes()))
    code, stdout, err = run(["analyze", *(str(p) for p, _ in inputs), "--radii", "0.5",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_text().count("| t.md.") == 2
    for path, before in inputs:
        assert path.read_bytes() == before, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md", "t.md.merge-tmp", "t.md.tmp"]


def test_an_interrupted_overwrite_says_to_resume_without_it(tmp_path, capsys, monkeypatch):
    """certify --overwrite interrupted: the hint is to rerun without --overwrite (the same
    command would discard the rows again), and that resumes to the uninterrupted rows."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    common = ["--max", "12", "--images-per-batch", "4", "--no-progress"]
    assert run(["certify", str(ckpt), "--out", str(full)] + common, capsys)[0] == 0
    part.write_bytes(full.read_bytes())
    real = certify_data.certify
    monkeypatch.setattr(certify_data, "certify", interrupted_on_call(real, 2))
    code, _, err = run(["certify", str(ckpt), "--out", str(part), "--overwrite"] + common, capsys)
    assert code == 130 and "rerun the same command without --overwrite to resume" in err, err
    assert len(read_results(part).rows) == 4
    monkeypatch.setattr(certify_data, "certify", real)
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + common, capsys)
    assert code == 0 and "certified 8 images" in out, (out, err)
    assert rows_without_time(part) == rows_without_time(full)
