"""`dssn train --resume`: the training state saved after every epoch (atomically, beside
the output) continues an interrupted training to the very weights of an uninterrupted
one, bit for bit on the CPU; a state of other options is refused, an existing output
is kept unless --overwrite; no state or lock file is left behind."""
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow import trainer  # noqa: E402
from dssn_kernels.workflow.trainer import state_path  # noqa: E402
from testkit import (assert_refused, interrupt_after_epoch, interrupted_on_call,  # noqa: E402
                     saved)
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

TINY = ["--sigma", "0.5", "--epochs", "4", "--max-train", "96", "--batch-size", "32",
        "--no-progress", "--device", "cpu"]


def assert_same_weights(a, b):
    wa, wb = saved(a, "state_dict"), saved(b, "state_dict")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("opts", [[], ["--optimizer", "sgd", "--lr", "0.05", "--augment"]],
                         ids=["adam-onecycle", "sgd-cosine-augment"])
def test_interrupted_and_resumed_training_ends_with_the_same_weights(tmp_path, capsys,
                                                                     monkeypatch, opts):
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert run(["train", "--out", str(full)] + TINY + opts, capsys)[0] == 0
    # the state removed once the checkpoint is written, the lock (full.pt.lock) released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt"]
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(2))
    code, out, err = run(["train", "--out", str(part)] + TINY + opts, capsys)
    assert code == 130 and "--resume" in err, err
    assert not part.exists() and state_path(part).exists()
    # written atomically: no temporary file is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt", "part.pt.train-state"]
    assert torch.load(state_path(part), weights_only=True)["epoch"] == 2
    monkeypatch.undo()

    code, out, err = run(["train", "--out", str(part), "--resume"] + TINY + opts, capsys)
    assert code == 0, err
    assert not state_path(part).exists()
    assert_same_weights(part, full)


def test_interrupted_mid_epoch_resumes_from_the_last_finished_epoch(tmp_path, capsys,
                                                                    monkeypatch):
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert run(["train", "--out", str(full)] + TINY, capsys)[0] == 0
    # 3 steps per epoch: the 8th is in epoch 3
    monkeypatch.setattr(trainer, "training_noise", interrupted_on_call(trainer.training_noise, 8))
    assert run(["train", "--out", str(part)] + TINY, capsys)[0] == 130
    assert torch.load(state_path(part), weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    assert run(["train", "--out", str(part), "--resume"] + TINY, capsys)[0] == 0
    assert_same_weights(part, full)


def test_resume_refusals_and_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    state = state_path(out)
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(1))
    assert run(["train", "--out", str(out)] + TINY, capsys)[0] == 130
    monkeypatch.undo()
    before = snapshot(state)

    def refused(argv, *patterns):
        code, _, err = run(argv, capsys)
        assert_refused(code, err, *patterns)
        assert snapshot(state) == before and not out.exists()

    # another option than the interrupted training's: refused, naming it
    # (a later option wins: TINY + [...] changes one)
    refused(["train", "--out", str(out), "--resume"] + TINY + ["--epochs", "5"],
            "different training", "epochs 4 (saved) vs 5 (this run)")
    refused(["train", "--out", str(out), "--resume", "--lr", "0.01"] + TINY, "lr ")
    refused(["train", "--out", str(out), "--resume", "--train-seed", "1"] + TINY, "train_seed")
    refused(["train", "--out", str(out), "--resume"] + TINY + ["--sigma", "0.25"], "spec.")
    # a fresh start over an interrupted training needs --resume or --overwrite
    refused(["train", "--out", str(out)] + TINY, "interrupted training", "--resume", "--overwrite")

    # --resume with no state: a fresh start (said on stderr), the same weights
    fresh = tmp_path / "fresh.pt"
    code, _, err = run(["train", "--out", str(fresh), "--resume"] + TINY, capsys)
    assert code == 0 and "starting from epoch 1" in err
    # --overwrite without --resume starts again and replaces the state
    assert run(["train", "--out", str(out), "--overwrite"] + TINY, capsys)[0] == 0
    assert not state.exists()
    assert_same_weights(out, fresh)

    # an existing output (a checkpoint or any other file) is kept unless --overwrite
    before = snapshot(out)
    for target in (out, tmp_path / "results.tsv"):
        if not target.exists():
            target.write_text("precious\n")
        kept = snapshot(target)
        code, _, err = run(["train", "--out", str(target)] + TINY, capsys)
        assert code == 2 and "exists" in err and "--overwrite" in err, err
        assert snapshot(target) == kept and not state_path(target).exists()
    assert snapshot(out) == before


def test_training_state_written_through_a_unique_temporary(tmp_path, monkeypatch):
    """OUT.train-state is replaced atomically through a new temporary file: a user's file
    named OUT.train-state.tmp is never touched; a failed write names the state file, keeps
    the last state and leaves no temporary file."""
    from dssn_kernels.workflow.options import WorkflowError

    state = tmp_path / "m.pt.train-state"
    users = tmp_path / "m.pt.train-state.tmp"
    users.write_bytes(b"mine")
    trainer._save_state(state, {"format": trainer.STATE_FORMAT, "epoch": 1})
    assert users.read_bytes() == b"mine"
    assert torch.load(state, weights_only=True)["epoch"] == 1

    def full_disk(obj, f):
        f.write(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    with pytest.raises(WorkflowError, match=f"cannot write the training state {state}: No space"):
        trainer._save_state(state, {"format": trainer.STATE_FORMAT, "epoch": 2})
    monkeypatch.undo()
    assert torch.load(state, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, users.name]
