"""The chunked pipeline: counts identical for every chunk size and batch composition,
forward batches full and bounded, identical across backends and vs the reference."""
import pytest
import torch

import dssn_kernels as dk
import dssn_reference as ref
from conftest import CPU_BACKENDS
from testkit import IntegerLinear, images

BACKENDS = CPU_BACKENDS  # expected here (conftest), not asked of the package


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [1, 13, 60])
def test_counts_identical_for_every_batch_size(backend, L):
    x = images(4)
    model = IntegerLinear(48, 5, 255, seed=L)
    expected = ref.certify(model, x, L=L, q=255, seed=7).counts
    for bs in sorted({1, 7, L, L + 1, 2 * L - 1, 4 * L, 1000}):
        cert = dk.certify(model, x, L=L, q=255, seed=7, batch_size=bs, backend=backend)
        assert torch.equal(cert.counts, expected), bs


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_independent_of_batch_composition(backend):
    x = images(6, seed=3)
    model = IntegerLinear(48, 4, 255, seed=1)
    whole = dk.certify(model, x, L=29, batch_size=40, backend=backend).counts
    one_by_one = torch.cat([dk.certify(model, x[i:i + 1], L=29, batch_size=40, backend=backend).counts
                            for i in range(6)])
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    permuted = dk.certify(model, x[perm], L=29, batch_size=17, backend=backend).counts
    assert torch.equal(whole, one_by_one)
    assert torch.equal(permuted, whole[perm])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_batches_full_and_bounded(backend):
    """Images share forward batches: every forward but the last has exactly batch_size
    inputs, whatever L, so the workspace (and peak memory) does not grow with L."""
    for L, bs in [(13, 50), (60, 50), (220, 64), (7, 1000)]:
        model = IntegerLinear(48, 3, 255)
        dk.certify(model, images(5), L=L, batch_size=bs, backend=backend)
        total = 5 * L
        assert sum(model.calls) == total
        assert model.calls[:-1] == [bs] * (len(model.calls) - 1)
        assert model.calls[-1] == total - bs * (len(model.calls) - 1)


def test_backends_agree_on_a_cnn():
    """A float CNN (not integer-exact): same inputs bit for bit, so the same votes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 2 * 2, 10)).eval()
    x = images(3)
    certs = [dk.certify(model, x, sigma=0.25, batch_size=220, backend=b) for b in BACKENDS]
    for c in certs[1:]:
        assert torch.equal(c.counts, certs[0].counts)


def test_dssn_class_predict_and_certify():
    model = IntegerLinear(48, 4, 255, seed=2)
    x = images(3)
    smooth = dk.DSSN(model, num_classes=4, sigma=0.12)
    cert = smooth.certify(x)
    expected = ref.certify(model, x, sigma=0.12)
    assert torch.equal(cert.counts, expected.counts)
    assert torch.equal(smooth.predict(x), expected.prediction)
    assert cert.num_variants == dk.num_variants(0.12) == cert.counts.sum(1)[0]


@pytest.mark.parametrize("entry", ["certify", "certify_at", "predict"])
def test_cudnn_benchmark_is_set_for_the_model_and_restored(entry):
    """cudnn_benchmark=True holds while the model runs, in inference mode, and the previous
    setting comes back afterwards, also when the model raises."""
    seen = []

    def model(z):
        seen.append((torch.backends.cudnn.benchmark, torch.is_inference_mode_enabled()))
        return z.reshape(z.shape[0], -1)[:, :3]

    def failing(z):
        model(z)
        raise RuntimeError("boom")

    x = torch.randint(0, 256, (2, 1, 2, 2), dtype=torch.uint8)
    run = {"certify": lambda m: dk.certify(m, x, L=5, cudnn_benchmark=True),
           "certify_at": lambda m: dk.certify_at(m, x, 0.0, L=5, cudnn_benchmark=True),
           "predict": lambda m: dk.predict(m, x, L=5, cudnn_benchmark=True)}[entry]
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        run(model)
        assert seen and all(flags == (True, True) for flags in seen)
        assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError, match="boom"):
            run(failing)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = previous


@pytest.mark.parametrize("entry", ["certify", "certify_at", "predict"])
def test_one_workspace_for_every_forward(entry):
    """Every forward batch is a view of one workspace allocated once, of at most
    batch_size inputs, whatever L: no [B, L, d] tensor is ever built."""
    storages, rows = set(), []

    def model(z):
        storages.add(z.untyped_storage().data_ptr())
        rows.append(z.shape[0])
        return z.reshape(z.shape[0], -1)[:, :3] * 0 + torch.tensor([0.0, 1.0, 0.0])

    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    for L in (5, 300, 3091):
        storages.clear()
        rows.clear()
        if entry == "certify":
            dk.certify(model, x, L=L, batch_size=64)
        elif entry == "certify_at":
            dk.certify_at(model, x, 1.0, L=L, batch_size=64, chunk_size=7)
        else:
            dk.predict(model, x, L=L, batch_size=64, chunk_size=7)
        assert len(storages) == 1 and max(rows) <= 64, (L, len(storages), max(rows))
