"""The `dssn` workflow on each device: the same end-to-end runs on the CPU (CI) and, marked
``gpu``, on a CUDA device (skipped without one; `make gpu-check` runs them), so that the
GPU paths of the workflow, not only of the kernels, have a test that can run there and
cannot rot here.

* train (and train-denoiser) on the device, interrupted after an epoch and resumed: the
  state restores on the device (random generators included) and the run finishes; bit
  for bit against an uninterrupted run on the CPU (tests/test_train_resume.py has the
  CPU-only options), where the GPU's convolutions may be nondeterministic;
* certify on the device with every expected backend of that device: the same rows, votes
  included, for every backend and for a run interrupted and resumed (the backends expand
  the same variants bit for bit and vote exactly on the same logits);
* Monte Carlo certify on the device: resumed rows equal an uninterrupted run's (each
  image's generator lives on the device, seeded by (noise seed, index));
* the checkpoints written on the device certify on the CPU (they hold CPU tensors).
"""
import pytest
import torch

pytest.importorskip("sklearn")

from conftest import CPU_BACKENDS, CUDA_BACKENDS, gpu_param  # noqa: E402
from dssn_kernels.workflow import certify_data, denoiser, trainer  # noqa: E402
from dssn_kernels.workflow.results import read_results  # noqa: E402
from dssn_kernels.workflow.trainer import state_path  # noqa: E402
from testkit import interrupt_after_epoch, interrupted_on_call, saved  # noqa: E402
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

DEVICES = [pytest.param("cpu", id="cpu"), gpu_param("cuda", id="cuda")]
BACKENDS = {"cpu": CPU_BACKENDS, "cuda": CUDA_BACKENDS}
TRAIN = ["--sigma", "0.5", "--epochs", "3", "--max-train", "96", "--batch-size", "32",
         "--no-progress"]


def rows(path):
    """The result rows of a TSV without their time column (the 6th)."""
    return ["\t".join(c[:5] + c[6:]) for c in
            (ln.split("\t") for ln in path.read_text().splitlines()[2:])]


def recorded(into):
    """An ``_after_epoch`` hook that records the epochs a (resumed) training runs."""
    return into.append


def assert_same_weights(a, b):
    wa, wb = saved(a, "state_dict"), saved(b, "state_dict")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].device.type == "cpu", k
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small CNN trained on digits on the CPU (5 epochs): votes that are not all one
    class, for the certify tests of every device."""
    from dssn_kernels.workflow.trainer import train
    out = tmp_path_factory.mktemp("trained") / "m.pt"
    train(out, sigma=0.5, epochs=5, batch_size=64, device="cpu")
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_train_on_the_device_resumes_after_an_interruption(tmp_path, capsys, monkeypatch,
                                                           device):
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    opts = TRAIN + ["--device", device]
    code, _, err = run(["train", "--out", str(full)] + opts, capsys)
    assert code == 0, err
    assert saved(full, "training")["device"].startswith(device)
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(1))
    code, _, err = run(["train", "--out", str(part)] + opts, capsys)
    assert code == 130 and "--resume" in err, err
    assert saved(state_path(part), "epoch") == 1
    epochs = []
    monkeypatch.setattr(trainer, "_after_epoch", recorded(epochs))
    code, _, err = run(["train", "--out", str(part), "--resume"] + opts, capsys)
    assert code == 0, err
    assert epochs == [2, 3]            # continued after epoch 1, not started again
    assert not state_path(part).exists()
    if device == "cpu":
        assert_same_weights(part, full)
    else:   # a GPU's convolutions may sum in another order: same names, CPU tensors
        assert saved(part, "state_dict").keys() == saved(full, "state_dict").keys()
        assert all(v.device.type == "cpu" for v in saved(part, "state_dict").values())


@pytest.mark.parametrize("device", DEVICES)
def test_certify_on_the_device_gives_the_same_rows_for_every_backend(tmp_path, capsys,
                                                                     monkeypatch, trained,
                                                                     device):
    common = ["--max", "24", "--images-per-batch", "4", "--no-progress", "--device", device]
    ref = None
    for backend in BACKENDS[device]:
        out = tmp_path / f"{backend}.tsv"
        code, text, err = run(["certify", str(trained), "--out", str(out), "--backend",
                               backend] + common, capsys)
        assert code == 0 and "certified 24 images" in text, err
        got = rows(out)
        assert len(got) == 24
        if ref is None:
            ref = got
            counts = torch.tensor([r.counts for r in read_results(out).rows])
            assert (counts.argmax(1) != counts.argmax(1)[0]).any(), "all votes for one class"
        assert got == ref, backend
    # interrupted in the third batch, then resumed: the same rows
    part = tmp_path / "part.tsv"
    real = certify_data.certify
    monkeypatch.setattr(certify_data, "certify", interrupted_on_call(real, 3))
    code, _, err = run(["certify", str(trained), "--out", str(part)] + common, capsys)
    assert code == 130, err
    assert len(read_results(part).rows) == 8          # two whole batches were saved
    monkeypatch.setattr(certify_data, "certify", real)
    code, _, err = run(["certify", str(trained), "--out", str(part)] + common, capsys)
    assert code == 0, err
    assert rows(part) == ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["uniform", "ssn"])
def test_monte_carlo_on_the_device_resumes_to_the_same_rows(tmp_path, capsys, monkeypatch,
                                                            trained, device, method):
    common = ["--method", method, "--max", "6", "--n0", "8", "--n", "64", "--alpha", "0.01",
              "--no-progress", "--device", device]
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    code, _, err = run(["certify", str(trained), "--out", str(full)] + common, capsys)
    assert code == 0, err
    real = certify_data._mc_rows
    monkeypatch.setattr(certify_data, "_mc_rows", interrupted_on_call(real, 4))
    code, _, err = run(["certify", str(trained), "--out", str(part)] + common, capsys)
    assert code == 130, err
    assert len(read_results(part).rows) == 3
    monkeypatch.setattr(certify_data, "_mc_rows", real)
    code, _, err = run(["certify", str(trained), "--out", str(part)] + common, capsys)
    assert code == 0, err
    assert rows(part) == rows(full)
    assert sum(sum(r.counts) for r in read_results(full).rows) == 6 * 64


@pytest.mark.parametrize("device", DEVICES)
def test_denoiser_trained_on_the_device_certifies_on_the_cpu(tmp_path, capsys, monkeypatch,
                                                             trained, device):
    out = tmp_path / "den.pt"
    opts = ["--objective", "stability", "--epochs", "2", "--max-train", "64", "--batch-size",
            "32", "--depth", "3", "--width", "8", "--no-progress", "--device", device]
    monkeypatch.setattr(denoiser, "_after_epoch", interrupt_after_epoch(1))
    code, _, err = run(["train-denoiser", str(trained), "--out", str(out)] + opts, capsys)
    assert code == 130, err
    epochs = []
    monkeypatch.setattr(denoiser, "_after_epoch", recorded(epochs))
    code, _, err = run(["train-denoiser", str(trained), "--out", str(out), "--resume"] + opts,
                       capsys)
    assert code == 0, err
    assert epochs == [2]
    tsv = tmp_path / "den.tsv"
    code, text, err = run(["certify", str(out), "--out", str(tsv), "--max", "8",
                           "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and "certified 8 images" in text, err


@pytest.mark.parametrize("device", [gpu_param("cuda", id="cuda")])
def test_fp16_training_resumes_with_its_gradient_scaler(tmp_path, capsys, monkeypatch, device):
    """--autocast fp16 (CUDA only: refused on the CPU) trains with a gradient scaler whose
    state the training state carries; interrupted and resumed, the scaler restarts from
    the saved state and the run continues after epoch 1 and records fp16."""
    out = tmp_path / "fp16.pt"
    opts = TRAIN + ["--device", device, "--autocast", "fp16"]
    monkeypatch.setattr(trainer, "_after_epoch", interrupt_after_epoch(1))
    code, _, err = run(["train", "--out", str(out)] + opts, capsys)
    assert code == 130, err
    saved_scaler = torch.load(state_path(out), weights_only=True)["scaler"]
    loaded, epochs = [], []
    real_load = torch.amp.GradScaler.load_state_dict

    def spy(self, state):
        loaded.append(dict(state))
        return real_load(self, state)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", spy)
    monkeypatch.setattr(trainer, "_after_epoch", recorded(epochs))
    code, _, err = run(["train", "--out", str(out), "--resume"] + opts, capsys)
    assert code == 0, err
    assert len(loaded) == 1 and loaded[0]["scale"] == saved_scaler["scale"]
    assert loaded[0]["_growth_tracker"] == saved_scaler["_growth_tracker"]
    assert epochs == [2, 3]
    assert saved(out, "training")["autocast"] == "fp16"
