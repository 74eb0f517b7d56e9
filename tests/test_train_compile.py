"""`dssn train --compile` and `--autocast bf16|fp16`: the base classifier trained
through torch.compile of the model and/or under torch.autocast, both recorded in the
checkpoint's training dict and in the settings a resumed training must share. The
compiled tests use dynamo's "eager" backend (the hidden --compile-backend): the traced
graph runs the same ops, so the weights are those of the uncompiled training, bit for bit."""
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow import trainer  # noqa: E402
from dssn_kernels.workflow.trainer import state_path  # noqa: E402
from testkit import assert_refused, interrupt_after_epoch, saved  # noqa: E402
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

TINY = ["--sigma", "0.5", "--epochs", "2", "--max-train", "80", "--batch-size", "32",
        "--no-progress", "--device", "cpu"]
EAGER = ["--compile-backend", "eager"]


def weights(path):
    return saved(path, "state_dict")


def test_compiled_training_gives_the_uncompiled_weights_and_records_it(tmp_path, capsys):
    plain, compiled = tmp_path / "plain.pt", tmp_path / "compiled.pt"
    # the tail batch (80 = 2 * 32 + 16) is another static shape: compiled once more
    assert run(["train", "--out", str(plain)] + TINY, capsys)[0] == 0
    # a plain training records neither (its records are as before the flags existed)
    assert not {"compile", "autocast"} & set(saved(plain, "training"))
    code, _, err = run(["train", "--out", str(compiled)] + TINY + EAGER, capsys)
    assert code == 0, err
    assert saved(compiled, "training")["compile"] == {"backend": "eager"}
    assert saved(compiled, "training")["autocast"] is None
    a, b = weights(plain), weights(compiled)
    assert a.keys() == b.keys()                      # no _orig_mod. prefix
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_autocast_training_runs_and_records_it(tmp_path, capsys):
    plain, out = tmp_path / "plain.pt", tmp_path / "bf16.pt"
    assert run(["train", "--out", str(plain)] + TINY, capsys)[0] == 0
    code, stdout, err = run(["train", "--out", str(out), "--autocast", "bf16"] + TINY, capsys)
    assert code == 0, err
    training = saved(out, "training")
    assert training["autocast"] == "bf16" and training["compile"] is False
    assert torch.isfinite(torch.tensor(training["final_loss"]))
    w = weights(out)
    assert all(v.dtype == weights(plain)[k].dtype for k, v in w.items())   # fp32 weights
    assert any(not torch.equal(v, weights(plain)[k]) for k, v in w.items())  # bf16 forwards


def test_fp16_autocast_on_the_cpu_is_refused(tmp_path, capsys):
    out = tmp_path / "fp16.pt"
    code, _, err = run(["train", "--out", str(out), "--autocast", "fp16"] + TINY, capsys)
    assert_refused(code, err, "--autocast fp16", "CUDA", "bf16")
    assert not out.exists() and not state_path(out).exists()


def test_bad_compile_argument_is_refused(tmp_path):
    from dssn_kernels.workflow.options import WorkflowError

    with pytest.raises(WorkflowError, match="--compile"):
        trainer.train(tmp_path / "m.pt", sigma=0.5, epochs=1, max_train=8,
                      compile={"dynamic": True})


def test_resume_with_other_precision_settings_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    state = state_path(out)
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(1))
    assert run(["train", "--out", str(out), "--autocast", "bf16"] + TINY, capsys)[0] == 130
    monkeypatch.undo()
    assert torch.load(state, weights_only=True)["settings"]["autocast"] == "bf16"
    before = state.read_bytes()
    for other, pattern in ((["--autocast", "fp16", "--device", "cpu"], "--autocast fp16"),
                           ([], "autocast \"bf16\" (saved) vs null (this run)"),
                           (EAGER + ["--autocast", "bf16"], "compile false (saved)")):
        code, _, err = run(["train", "--out", str(out), "--resume"] + TINY + other, capsys)
        assert_refused(code, err, pattern)
        assert state.read_bytes() == before and not out.exists()
    # the same flags resume it
    code, _, err = run(["train", "--out", str(out), "--resume", "--autocast", "bf16"] + TINY,
                       capsys)
    assert code == 0, err
    assert saved(out, "training")["autocast"] == "bf16" and not state.exists()
