"""Denoised smoothing (the paper's Appendix D): the DnCNN, the objectives' losses, `dssn train --noise
none`, `dssn train-denoiser` end to end (the frozen classifier untouched, the composed
checkpoint certifying as nn.Sequential(denoiser, classifier) built by hand), resume bit for
bit, --init (a stability denoiser starting from the MSE one's weights), and the refusals."""
import hashlib
import math

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

import dssn_kernels as dk  # noqa: E402
from dssn_kernels.workflow import cli, denoiser  # noqa: E402
from dssn_kernels.workflow.checkpoint import (SmoothingSpec,  # noqa: E402
                                              load_checkpoint, save_checkpoint)
from dssn_kernels.workflow.data import load_dataset  # noqa: E402
from dssn_kernels.workflow.models import DnCNN, SmallCNN  # noqa: E402
from dssn_kernels.workflow.trainer import state_path  # noqa: E402
from testkit import assert_refused, interrupt_after_epoch, saved  # noqa: E402
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process", "one_thread")

TINY = ["--max-train", "64", "--batch-size", "32", "--depth", "3", "--width", "8",
        "--no-progress", "--device", "cpu"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean_classifier(tmp_path_factory):
    """A classifier trained on clean digits (`dssn train --noise none`), tiny budget."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("clean") / "clean.pt"
    code = cli.main(["train", "--noise", "none", "--sigma", "0.5", "--epochs", "2",
                     "--max-train", "128", "--batch-size", "32", "--no-progress",
                     "--device", "cpu", "--out", str(path)])
    assert code == 0
    return path


# ------------------------------------------------------------------------ the model

def test_dncnn_shapes_range_and_residual():
    torch.manual_seed(0)
    d = DnCNN(in_channels=3, depth=4, width=8).eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        y = d(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0          # clamped to [0, 1]
    assert sum(isinstance(m, nn.Conv2d) for m in DnCNN().modules()) == 17   # Salman's default
    assert sum(isinstance(m, nn.BatchNorm2d) for m in DnCNN().modules()) == 15
    # residual: a zero noise estimate returns the input itself; unclamped leaves the range
    nn.init.zeros_(d.dncnn[-1].weight)
    assert torch.equal(d(x), x)
    u = DnCNN(in_channels=1, depth=3, width=4, clamp=False).eval()
    with torch.no_grad():
        u.dncnn[-1].weight.fill_(0.0)
        u.dncnn[-1].weight[0, 0, 1, 1] = -1.0      # estimate -> -h, output x + h
        u.dncnn[0].weight.fill_(0.0)
        u.dncnn[0].bias.fill_(1.0)                  # h = relu(BN(conv(1))) stays >= 0
        assert u(torch.ones(1, 1, 4, 4)).max() >= 1.0


# ------------------------------------------------------------------------ the objectives

class MeanLogits(nn.Module):
    """logits [m, -m], m the image mean: class 0 iff the mean is positive."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([m, -m], 1)


def test_objective_losses_by_hand():
    ident, clf = nn.Identity(), MeanLogits()
    clean = torch.ones(2, 1, 2, 2)
    noisy = torch.full((2, 1, 2, 2), 0.5)
    # mse: mean over pixels of (D(noisy) - clean)^2 = 0.25
    assert denoiser.objective_loss("mse", ident, clf, clean, noisy).item() == pytest.approx(0.25)
    # stability: label argmax F(clean) = 0; F(D(noisy)) = [0.5, -0.5]: CE = log(1 + e^-1)
    assert denoiser.objective_loss("stability", ident, clf, clean, noisy).item() == \
        pytest.approx(math.log1p(math.exp(-1.0)))
    # the stability label is F's clean prediction, not the true label: flip the clean mean
    assert denoiser.objective_loss("stability", ident, clf, -clean, noisy).item() == \
        pytest.approx(math.log1p(math.exp(1.0)))
    # classify (mse-retrain's second phase): the true labels
    labels = torch.tensor([1, 1])
    assert denoiser.objective_loss("classify", ident, clf, clean, noisy, labels).item() == \
        pytest.approx(math.log1p(math.exp(1.0)))
    with pytest.raises(ValueError, match="objective"):
        denoiser.objective_loss("nope", ident, clf, clean, noisy)


# ------------------------------------------------------------------------ end to end

def test_clean_training_records_noise_none(clean_classifier):
    ckpt = torch.load(clean_classifier, weights_only=True)
    assert ckpt["training"]["noise"] == "none" and ckpt["model"]["arch"] == "small_cnn"


def test_train_denoiser_cli_frozen_classifier_and_certify(clean_classifier, tmp_path, capsys):
    before = {k: v.clone() for k, v in saved(clean_classifier, "state_dict").items()}
    out = tmp_path / "den.pt"
    code, text, err = run(["train-denoiser", str(clean_classifier), "--objective", "stability",
                           "--epochs", "2", "--out", str(out)] + TINY, capsys)
    assert code == 0, err
    assert "stability denoiser" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den.pt"]   # no state, no lock
    # the classifier's weights: bit-identical in its own file and inside the composition
    after, composed = saved(clean_classifier, "state_dict"), saved(out, "state_dict")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert torch.equal(before[k], composed["classifier." + k]), k
    assert any(k.startswith("denoiser.") for k in composed)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model"]["arch"] == "denoised"
    assert ckpt["training"]["objective"] == "stability"

    # certify of the checkpoint = certify of nn.Sequential(denoiser, classifier) by hand
    model, spec = load_checkpoint(out)
    den = DnCNN(**ckpt["model"]["kwargs"]["denoiser"]["kwargs"])
    den.load_state_dict({k[len("denoiser."):]: v for k, v in composed.items()
                         if k.startswith("denoiser.")})
    clf, _ = load_checkpoint(clean_classifier)
    by_hand = nn.Sequential(den, clf).eval()
    x, _ = load_dataset("digits", "test").get(list(range(12)))
    a = dk.certify(model, x, **spec.certify_kwargs())
    b = dk.certify(by_hand, x, **spec.certify_kwargs())
    assert torch.equal(a.counts, b.counts) and torch.equal(a.prediction, b.prediction)

    # and `dssn certify` / `analyze` take it like any other checkpoint
    tsv = tmp_path / "den.tsv"
    code, text, err = run(["certify", str(out), "--out", str(tsv), "--max", "12",
                           "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    code, text, err = run(["analyze", f"stab={tsv}"], capsys)
    assert code == 0 and "stab" in text, err


def test_mse_retrain_replaces_the_classifier(clean_classifier, tmp_path, capsys):
    out = tmp_path / "retrain.pt"
    code, _, err = run(["train-denoiser", str(clean_classifier), "--objective", "mse-retrain",
                        "--epochs", "1", "--retrain-epochs", "1", "--out", str(out)] + TINY,
                       capsys)
    assert code == 0, err
    orig, composed = saved(clean_classifier, "state_dict"), saved(out, "state_dict")
    assert not all(torch.equal(orig[k], composed["classifier." + k]) for k in orig)
    model, spec = load_checkpoint(out)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_resume_ends_with_the_same_weights(clean_classifier, tmp_path, capsys, monkeypatch):
    opts = ["--objective", "mse-retrain", "--epochs", "1", "--retrain-epochs", "1"] + TINY
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert run(["train-denoiser", str(clean_classifier), "--out", str(full)] + opts, capsys)[0] == 0
    monkeypatch.setattr(denoiser, "_after_epoch", interrupt_after_epoch(1))
    code, _, err = run(["train-denoiser", str(clean_classifier), "--out", str(part)] + opts,
                       capsys)
    assert code == 130 and "--resume" in err, err
    assert not part.exists() and state_path(part).exists()
    monkeypatch.undo()
    # another objective's state is refused, naming the difference
    code, _, err = run(["train-denoiser", str(clean_classifier), "--out", str(part), "--resume",
                        "--objective", "mse", "--epochs", "1"] + TINY, capsys)
    assert code == 2 and "objective" in err, err
    code, _, err = run(["train-denoiser", str(clean_classifier), "--out", str(part),
                        "--resume"] + opts, capsys)
    assert code == 0, err
    a, b = saved(full, "state_dict"), saved(part, "state_dict")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _foreign_classifier(path, *, q=16, shape=(1, 8, 8)):
    spec = SmoothingSpec.create(sigma=0.5, q=q, input_shape=shape, num_classes=10)
    model = SmallCNN(in_channels=shape[0], image_size=shape[1])
    save_checkpoint(path, model, arch="small_cnn",
                    model_kwargs={"num_classes": 10, "in_channels": shape[0],
                                  "image_size": shape[1]},
                    spec=spec, dataset={"name": "digits", "split": "train"})
    return path


def test_refusals(clean_classifier, tmp_path, capsys):
    out = tmp_path / "den.pt"
    base = ["--objective", "mse", "--epochs", "1"] + TINY
    code, _, err = run(["train-denoiser", str(_foreign_classifier(tmp_path / "q.pt", q=255)),
                        "--out", str(out)] + base, capsys)
    assert code == 2 and "q=255" in err and not out.exists(), err
    code, _, err = run(["train-denoiser",
                        str(_foreign_classifier(tmp_path / "s.pt", shape=(3, 8, 8))),
                        "--out", str(out)] + base, capsys)
    assert code == 2 and "[3, 8, 8]" in err and not out.exists(), err
    out.write_bytes(b"mine")
    code, _, err = run(["train-denoiser", str(clean_classifier), "--out", str(out)] + base,
                       capsys)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"mine", err
    code, _, err = run(["train-denoiser", str(tmp_path / "missing.pt"), "--out",
                        str(tmp_path / "x.pt")] + base, capsys)
    assert code == 2 and "missing.pt" in err, err
    code, _, err = run(["train-denoiser", str(clean_classifier), "--out", str(tmp_path / "x.pt"),
                        "--q", "255"] + base, capsys)
    assert_refused(code, err, "--q 255 disagrees with the classifier checkpoint's q=16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den.pt", "q.pt", "s.pt"]


# ------------------------------------------------------------------------ --init

@pytest.fixture(scope="module")
def mse_denoiser(clean_classifier, tmp_path_factory):
    """An MSE denoiser in front of the clean classifier, tiny budget."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("mse") / "mse.pt"
    assert cli.main(["train-denoiser", str(clean_classifier), "--objective", "mse",
                     "--epochs", "1", "--out", str(path)] + TINY) == 0
    return path


def denoiser_weights(path):
    return {k[len("denoiser."):]: v for k, v in saved(path, "state_dict").items()
            if k.startswith("denoiser.")}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_starts_the_stability_denoiser_from_the_mse_one(clean_classifier, mse_denoiser,
                                                             tmp_path, capsys, monkeypatch):
    # the denoiser's weights when the first loss is computed, before the first step
    first, objective_loss = [], denoiser.objective_loss

    def spy(phase, den, *args):
        if not first:
            first.append({k: v.detach().clone() for k, v in den.state_dict().items()})
        return objective_loss(phase, den, *args)

    monkeypatch.setattr(denoiser, "objective_loss", spy)
    out = tmp_path / "stab.pt"
    argv = ["train-denoiser", str(clean_classifier), "--objective", "stability", "--epochs", "1",
            "--out", str(out)] + TINY
    code, _, err = run(argv + ["--init", str(mse_denoiser)], capsys)
    assert code == 0, err
    mse = denoiser_weights(mse_denoiser)
    assert same(first[0], mse)                       # every weight and batch-norm statistic
    assert not same(denoiser_weights(out), mse)      # and trained from there
    training = saved(out, "training")
    assert training["init"] == str(mse_denoiser)
    assert training["init_sha256"] == hashlib.sha256(mse_denoiser.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stab.pt"]   # no state, no lock

    # without --init the same run starts elsewhere (from the seed's random weights)
    first.clear()
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert not same(first[0], mse)
    assert "init" not in saved(out, "training")


def test_init_refusals_and_resume(clean_classifier, mse_denoiser, tmp_path, capsys, monkeypatch):
    out = tmp_path / "stab.pt"
    argv = ["train-denoiser", str(clean_classifier), "--objective", "stability", "--epochs", "2",
            "--out", str(out)] + TINY
    init = ["--init", str(mse_denoiser)]
    other = tmp_path / "other.pt"                    # the same denoiser in other bytes
    ckpt = torch.load(mse_denoiser, weights_only=True)
    ckpt["training"]["note"] = "a copy"
    torch.save(ckpt, other)

    def files():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}

    def refused(extra, *patterns):
        before = files()
        code, _, err = run(argv + extra, capsys)
        assert_refused(code, err, *patterns)
        assert files() == before

    refused(["--init", str(tmp_path / "missing.pt")], "--init", "missing.pt")
    refused(["--init", str(clean_classifier)], "is not a denoiser checkpoint", "'small_cnn'")
    refused(init + ["--depth", "4"], "holds another denoiser", "depth 3 (init) vs 4 (this run)")
    refused(init + ["--width", "4"], "width 8 (init) vs 4 (this run)")
    refused(init + ["--no-clamp"], "clamp true (init) vs false (this run)")
    refused(init + ["--sigma", "0.25"], "other smoothing", "sigma=0.5 (L=", "(init) vs sigma=0.25")
    refused(init + ["--seed", "3"], "other smoothing", "seed=0) (init) vs", "seed=3) (this run)")
    refused(init + ["--noise", "ssn"], "noise dssn (init) vs ssn (this run)")
    assert sorted(files()) == ["other.pt"]

    # the init is part of the training: a resume with another one, or none, is refused
    monkeypatch.setattr(denoiser, "_after_epoch", interrupt_after_epoch(1))
    assert run(argv + init, capsys)[0] == 130
    monkeypatch.undo()
    assert state_path(out).exists()
    refused(["--resume", "--init", str(other)], "different training", "init_sha256")
    refused(["--resume"], "different training", "init_sha256")
    code, _, err = run(argv + init + ["--resume"], capsys)
    assert code == 0, err
    assert saved(out, "training")["init_sha256"] == hashlib.sha256(mse_denoiser.read_bytes()).hexdigest()


def test_denoise_demo_quick(tmp_path, capsys):
    from dssn_kernels.workflow import denoise_demo

    files = denoise_demo.main(["--quick", "--sigmas", "0.5", "--out", str(tmp_path)])
    assert list(files) == list(denoise_demo.LABELS)
    text = capsys.readouterr().out
    assert "Table 1" in text and all(f"| {label} |" in text for label in denoise_demo.LABELS)
    assert (tmp_path / "table.md").is_file()
    # (c) starts from (b)'s MSE denoiser, as Salman et al.'s stability denoisers do
    training = saved(tmp_path / "stability-sigma0.5.pt", "training")
    assert training["init"] == str(tmp_path / "mse-sigma0.5.pt")
