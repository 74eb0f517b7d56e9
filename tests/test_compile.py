"""Compiled certification (``compile=``) and ``logit_drift``.

Compilations are counted with torch._dynamo's counters (``counters["stats"]
["unique_graphs"]``, one per graph compiled), reset before every test. Every test but one
compiles with ``backend="eager"`` or ``"aot_eager"`` (dynamo traces and guards exactly as
for inductor, without inductor's code generation, which takes 10-30 s per model on 2
cores); ``test_compiled_certify_counts_are_the_compiled_models_votes`` uses inductor, the
default backend.
"""
import copy
import gc
import pickle
import weakref

import pytest
import torch

import dssn_kernels as dk
from dssn_kernels import pipeline
from dssn_kernels.checks import check_compile
from dssn_kernels.workflow.baselines import certify_uniform
from testkit import IntegerLinear, images

EAGER = {"backend": "eager"}
AOT = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Plain(torch.nn.Module):
    """IntegerLinear's exact integer logits, without its Python-side call log."""

    def __init__(self, dim, K, q, seed=0):
        super().__init__()
        self.inner = IntegerLinear(dim, K, q, seed=seed)
        self.q = q

    def forward(self, x):
        m = torch.round(x.reshape(x.shape[0], -1).double() * (4 * self.q))
        return m @ self.inner.weight + self.inner.bias


class NanOnZeroRows(Plain):
    """NaN logits for an all-zero input row (what the padding of the first round holds)."""

    def forward(self, x):
        out = super().forward(x)
        zero = x.reshape(x.shape[0], -1).abs().sum(1) == 0
        return torch.where(zero[:, None], torch.full_like(out, float("nan")), out)


class SmallConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.eval()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_check_compile():
    assert check_compile(False) is None and check_compile(None) is None
    assert check_compile(True) == {}
    assert check_compile("max-autotune") == {"mode": "max-autotune"}
    assert check_compile({"backend": "eager"}) == {"backend": "eager"}
    with pytest.raises(ValueError, match="compile mode"):
        check_compile("fast")
    with pytest.raises(ValueError, match="dynamic"):
        check_compile({"dynamic": True})
    with pytest.raises(TypeError, match="compile must be"):
        check_compile(3)
    with pytest.raises(ValueError, match="compile mode"):
        dk.certify(Plain(48, 3, 255), images(1), sigma=0.25, compile="fast")


def test_compiled_certify_counts_are_the_compiled_models_votes():
    """Inductor (the default backend). The counts of a compiled certify are the argmax
    votes of the same compiled model (the cached one) called by hand on dk.variants, in
    batches of batch_size rows with the tail padded; one compilation in all."""
    model, x, bs = SmallConv(), images(2, (3, 4, 4)), 96
    cert = dk.certify(model, x, sigma=0.25, batch_size=bs, compile=True)
    L = cert.num_variants
    assert 2 * L % bs != 0                                   # the last forward is partial
    compiled, _ = pipeline.compiled_model(model, {}, rows=bs, shape=(3, 4, 4),
                                          dtype=torch.float32, device="cpu")
    v = dk.variants(x, sigma=0.25).reshape(2 * L, 3, 4, 4)
    votes = []
    with torch.inference_mode():
        for pos in range(0, 2 * L, bs):
            chunk = v[pos:pos + bs]
            padded = torch.zeros(bs, 3, 4, 4)
            padded[:len(chunk)] = chunk
            votes.append(compiled(padded)[:len(chunk)].argmax(1))
    votes = torch.cat(votes).view(2, L)
    expected = torch.stack([torch.bincount(r, minlength=5) for r in votes])
    assert torch.equal(cert.counts, expected)
    assert graphs() == 1


def test_one_compilation_for_a_run_and_for_later_runs():
    model, x = Plain(48, 4, 255), images(3)
    eager = dk.certify(model, x, sigma=0.25, batch_size=128)
    L = eager.num_variants
    assert 3 * L % 128 != 0
    cert = dk.certify(model, x, sigma=0.25, batch_size=128, compile=EAGER)
    assert graphs() == 1
    assert torch.equal(cert.counts, eager.counts)
    # another number of images, early exit, the DSSN class: the same shape, cached
    dk.certify(model, x[:1], sigma=0.25, batch_size=128, compile=EAGER)
    dk.predict(model, x, sigma=0.25, batch_size=128, compile=EAGER)
    dk.DSSN(model, 4, 0.25, batch_size=128, compile=EAGER).certify_at(x, 0.01)
    assert graphs() == 1
    # another batch size is another shape: one more
    dk.certify(model, x, sigma=0.25, batch_size=100, compile=EAGER)
    assert graphs() == 2


def test_padded_rows_never_vote():
    """One image, L = 220 < batch 256: 36 rows of padding (zeros) in every forward; the
    model returns NaN for them, which would raise if they voted."""
    model = NanOnZeroRows(48, 3, 255)
    x = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    eager = dk.certify(model, x, sigma=0.25)
    cert = dk.certify(model, x, sigma=0.25, compile=AOT)
    assert torch.equal(cert.counts, eager.counts)
    assert int(cert.counts.sum()) == cert.num_variants
    pred = dk.predict(model, x, sigma=0.25, compile=AOT, chunk_size=7)
    assert torch.equal(pred.prediction, eager.prediction)


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_early_exit_with_compile_decides_as_without(margin):
    model, x = Plain(48, 4, 255, seed=2), images(5, seed=4)
    kw = dict(sigma=0.5, batch_size=64, margin=margin)
    for radius in (0.0, 0.01, 0.05):
        a = dk.certify_at(model, x, radius, **kw)
        b = dk.certify_at(model, x, radius, compile=EAGER, **kw)
        assert torch.equal(a.certified, b.certified)
        assert torch.equal(a.prediction, b.prediction)
        assert torch.equal(a.evaluated, b.evaluated)
    a, b = dk.predict(model, x, **kw), dk.predict(model, x, compile=EAGER, **kw)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.evaluated, b.evaluated)
    assert graphs() == 1


def test_monte_carlo_baseline_compiled():
    model, x = Plain(48, 3, 255), images(2).float() / 255
    kw = dict(sigma=0.25, n0=10, n=300, batch_size=64)
    a = certify_uniform(model, x, generator=torch.Generator().manual_seed(1), **kw)
    b = certify_uniform(model, x, generator=torch.Generator().manual_seed(1), compile=EAGER,
                        **kw)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.selection_counts,
                                                           b.selection_counts)
    assert graphs() == 1


def test_compiled_model_cached_for_the_life_of_the_model():
    model = Plain(48, 3, 255)
    dk.certify(model, images(1), sigma=0.25, compile=EAGER)
    assert len(vars(model)[pipeline.COMPILED_ATTR]) == 1
    assert "_dssn_compiled" not in model.state_dict() and len(list(model.modules())) == 2
    assert len(vars(copy.deepcopy(model))[pipeline.COMPILED_ATTR]) == 0
    assert len(vars(pickle.loads(pickle.dumps(model)))[pipeline.COMPILED_ATTR]) == 0
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None                    # the cache does not keep the model alive


class BatchShift(Plain):
    """Exact integer logits, class 0 lowered by 0.25 when the forward batch has 7 rows."""

    def forward(self, x):
        out = super().forward(x)
        if x.shape[0] == 7:
            out = out.clone()
            out[:, 0] -= 0.25
        return out


def test_logit_drift_measures_a_known_difference():
    model, x = BatchShift(48, 3, 255, seed=5), images(2, seed=6)
    L = 14                                    # 28 variants: batches of 7 are all full
    drift = dk.logit_drift(model, x, L=L, other=dict(batch_size=7))
    assert drift.max == 0.25 and drift.margin > 0.5
    assert drift.margin == torch.nextafter(torch.tensor(0.5, dtype=torch.float64),
                                           torch.tensor(1.0, dtype=torch.float64)).item()
    assert drift.per_image.tolist() == [0.25, 0.25] and drift.variants == L
    # votes that differ, by hand: class 0 led by an exact tie, now behind by 0.25
    logits = Plain(48, 3, 255, seed=5)(dk.variants(x, L=L).reshape(2 * L, 3, 4, 4))
    shifted = logits.clone()
    shifted[:, 0] -= 0.25
    by_hand = (logits.argmax(1) != shifted.argmax(1)).view(2, L).sum(1)
    assert torch.equal(drift.votes_differ, by_hand)
    # the same evaluation: no drift
    assert dk.logit_drift(model, x, L=L, other=dict(batch_size=8)).max == 0.0
    # a certificate with the measured margin holds for both evaluations
    c8 = dk.certify(model, x, L=L, batch_size=8, margin=drift.margin)
    c7 = dk.certify(model, x, L=L, batch_size=7)
    ok = c8.steps >= 0
    assert torch.equal(c8.prediction[ok], c7.prediction[ok])
    assert bool((c7.steps[ok] >= c8.steps[ok]).all())


class FirstPixels(torch.nn.Module):
    """Logits (m_0, m_1): the exact numerators m = 4q x~ of the first two pixels; in a
    forward batch of 7 rows class 0 is lowered by m_2 / 2 (exact in float32), a drift
    that differs from variant to variant."""

    def forward(self, x):
        m = torch.round(x.reshape(x.shape[0], -1).double() * (4 * 255))
        out = m[:, :2].clone()
        if x.shape[0] == 7:
            out[:, 0] -= m[:, 2] / 2
        return out


def test_logit_drift_measures_the_variants_asked_for():
    """start/stop choose the variants both evaluations run (rounds of 7 rows, all full):
    the drift per image and the votes that differ are those of variants start..stop-1, by
    hand from dk.variants."""
    x = images(2, seed=6)
    L, start, stop = 14, 3, 10
    drift = dk.logit_drift(FirstPixels(), x, L=L, start=start, stop=stop,
                           other=dict(batch_size=7))
    assert drift.variants == stop - start and drift.num_variants == L
    m = torch.round(dk.variants(x, L=L, start=start, stop=stop).double() * (4 * 255))
    m = m.reshape(2, stop - start, -1)
    shift = m[:, :, 2] / 2
    assert drift.per_image.tolist() == shift.amax(1).tolist()
    assert drift.max == shift.max().item()
    flips = (m[:, :, 0] >= m[:, :, 1]) & (m[:, :, 0] - shift < m[:, :, 1])
    assert torch.equal(drift.votes_differ, flips.sum(1))
    assert flips.any()                        # the check is not vacuous


class Float64Jitter(torch.nn.Module):
    """float64 logits 1/2 + 1e-12 * (0, 1) in forward batches of 16 rows, 1/2 + 1e-12 *
    (2, 1) in smaller ones: every vote flips between the two evaluations, yet the logits
    of both round to the same float32 (1/2)."""

    def forward(self, x):
        z = torch.full((x.shape[0], 2), 0.5, dtype=torch.float64)
        z += torch.tensor([2e-12, 1e-12] if x.shape[0] < 16 else [0.0, 1e-12],
                          dtype=torch.float64)
        return z


def test_logit_drift_of_float64_logits_is_not_rounded_to_float32():
    """The drift is measured on the logits as the model returned them (float64 here, the
    vote kernels read them so): a drift hidden by rounding to float32 would give a margin
    (5e-324) under which the two evaluations certify different classes."""
    model, x, L = Float64Jitter(), images(1, shape=3), 16
    drift = dk.logit_drift(model, x, L=L, other=dict(batch_size=4))
    assert drift.votes_differ.tolist() == [L]
    assert drift.max == (0.5 + 2e-12) - 0.5 and drift.margin > 2 * drift.max
    c16 = dk.certify(model, x, L=L, margin=drift.margin)
    c4 = dk.certify(model, x, L=L, batch_size=4, margin=drift.margin)
    assert c16.num_ambiguous.tolist() == c4.num_ambiguous.tolist() == [L]
    assert c16.steps.tolist() == c4.steps.tolist() == [-1]        # certified: none


class HugeLogits(torch.nn.Module):
    """Logits (c, 0) with c = +inf (float32) or 1e300 (float64, beyond float32), the same
    in every evaluation."""

    def __init__(self, c, dtype):
        super().__init__()
        self.c, self.dtype = c, dtype

    def forward(self, x):
        z = torch.zeros((x.shape[0], 2), dtype=self.dtype)
        z[:, 0] = self.c
        return z


@pytest.mark.parametrize("c, dtype", [(float("inf"), torch.float32), (1e300, torch.float64)])
def test_logit_drift_of_equal_huge_logits_is_zero(c, dtype):
    """Equal logits do not drift, infinite or beyond float32 (the margin rule's gap of
    equal infinities is 0), instead of inf - inf = NaN."""
    drift = dk.logit_drift(HugeLogits(c, dtype), images(2, shape=3), L=8,
                           other=dict(batch_size=3))
    assert drift.max == 0.0 and drift.per_image.tolist() == [0.0, 0.0]
    assert drift.votes_differ.tolist() == [0, 0] and drift.margin == 5e-324


def test_logit_drift_eager_against_compiled_and_variant_range():
    model, x = Plain(48, 3, 255), images(2)
    drift = dk.logit_drift(model, x, sigma=0.25, start=10, stop=50,
                           reference=dict(batch_size=32), other=dict(compile=EAGER))
    assert drift.max == 0.0 and drift.variants == 40
    assert drift.votes_differ.tolist() == [0, 0]


def test_logit_drift_bad_arguments():
    model, x = Plain(48, 3, 255), images(1)
    with pytest.raises(ValueError, match="unknown setting"):
        dk.logit_drift(model, x, sigma=0.25, other=dict(batchsize=3))
    with pytest.raises(TypeError, match="other must be a dict"):
        dk.logit_drift(model, x, sigma=0.25, other=torch.bfloat16)
    def never(z):
        raise AssertionError("the model ran before the bad setting was refused")

    for bad in (dict(autocast=torch.float64), dict(dtype=torch.float64),
                dict(compile="fastest"), dict(batch_size=0)):
        with pytest.raises(ValueError, match="autocast|dtype|compile mode|batch_size"):
            dk.logit_drift(never, x, sigma=0.25, other=bad)    # before the reference runs
    with pytest.raises(TypeError):
        dk.logit_drift(model, x, sigma=0.25)            # other is required


def test_dssn_certify_records_the_evaluation_and_refuses_another(tmp_path, capsys):
    """`dssn certify --autocast bf16` (and compile=, here with the eager compile backend
    through certify_dataset: the CLI's --compile is inductor's) records the evaluation in
    the header; a resume with other settings is refused, nothing changed."""
    pytest.importorskip("sklearn")
    import json

    from dssn_kernels.workflow import certify_data, cli
    from dssn_kernels.workflow.results import ResultsError
    from testkit import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "a.pt")
    tsv = tmp_path / "r.tsv"
    assert cli.main(["certify", str(ckpt), "--out", str(tsv), "--max", "3", "--no-progress",
                     "--autocast", "bf16"]) == 0
    meta = json.loads(tsv.read_text().splitlines()[0].split(" ", 2)[2])
    assert meta["evaluation"] == {"autocast": "bfloat16"}
    before = tsv.read_bytes()
    capsys.readouterr()
    assert cli.main(["certify", str(ckpt), "--out", str(tsv), "--max", "4",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "evaluation" in err and "\n" not in err.strip()
    assert tsv.read_bytes() == before
    # the same settings resume (a larger --max)
    assert cli.main(["certify", str(ckpt), "--out", str(tsv), "--max", "4", "--no-progress",
                     "--autocast", "bf16"]) == 0
    # compiled: recorded, and refused against the autocast file
    tsv2 = tmp_path / "c.tsv"
    certify_data.certify_dataset(ckpt, tsv2, max_index=2, compile=EAGER)
    meta2 = json.loads(tsv2.read_text().splitlines()[0].split(" ", 2)[2])
    assert meta2["evaluation"] == {"compile": {"backend": "eager"}}
    with pytest.raises(ResultsError, match="different run"):
        certify_data.certify_dataset(ckpt, tsv, max_index=4, compile=EAGER, autocast="bf16")
    # an eager float32 run keeps the header of before (no evaluation key)
    tsv3 = tmp_path / "e.tsv"
    certify_data.certify_dataset(ckpt, tsv3, max_index=1)
    assert "evaluation" not in tsv3.read_text().splitlines()[0]
