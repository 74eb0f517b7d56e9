"""`dssn train --noise {dssn,ssn,uniform} [--stability [--stability-weight W]]`: each
noise trains, the checkpoint records noise and stability training, an interrupted run
resumes to the same weights, and a training state of another noise is refused."""
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow import trainer  # noqa: E402
from testkit import interrupt_after_epoch, saved  # noqa: E402
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

TINY = ["--sigma", "0.5", "--epochs", "2", "--max-train", "64", "--batch-size", "32",
        "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("opts,want", [
    ([], {"noise": "dssn", "stability": False}),
    (["--noise", "ssn"], {"noise": "ssn", "stability": False}),
    (["--noise", "uniform", "--stability"],
     {"noise": "uniform", "stability": True, "stability_weight": 6.0}),
    (["--noise", "dssn", "--stability", "--stability-weight", "2.5"],
     {"noise": "dssn", "stability": True, "stability_weight": 2.5}),
])
def test_each_noise_trains_and_is_recorded(tmp_path, capsys, opts, want):
    out = tmp_path / "m.pt"
    code, _, err = run(["train", "--out", str(out)] + TINY + opts, capsys)
    assert code == 0, err
    t = saved(out, "training")
    assert {k: t.get(k) for k in want} == want
    assert ("stability_weight" in t) == want["stability"]


def test_ssn_stability_resume_and_other_noise_refused(tmp_path, capsys, monkeypatch):
    opts = ["--noise", "ssn", "--stability"]
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert run(["train", "--out", str(full)] + TINY + opts, capsys)[0] == 0
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(1))
    assert run(["train", "--out", str(part)] + TINY + opts, capsys)[0] == 130
    monkeypatch.undo()
    code, _, err = run(["train", "--out", str(part), "--resume"] + TINY + ["--noise", "uniform",
                                                                          "--stability"], capsys)
    assert code != 0 and "noise" in err and "ssn" in err and "uniform" in err, err
    code, _, err = run(["train", "--out", str(part), "--resume"] + TINY + ["--noise", "ssn"], capsys)
    assert code != 0 and "stability" in err, err
    assert run(["train", "--out", str(part), "--resume"] + TINY + opts, capsys)[0] == 0
    a, b = saved(full, "state_dict"), saved(part, "state_dict")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_stability_weight(tmp_path, capsys):
    code, _, err = run(["train", "--out", str(tmp_path / "m.pt")] + TINY
                       + ["--stability", "--stability-weight", "-1"], capsys)
    assert code != 0 and "--stability-weight" in err, err
