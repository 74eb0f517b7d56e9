"""`dssn certify --method {ssn,uniform}`: Monte Carlo certificates of a data split through
the result-file machinery: Cohen et al.'s columns with the n and n0 counts, the rows
checked against their counts, resume after an interruption giving the rows of one
uninterrupted run (each image's noise seeded by (noise seed, index)), two-rank sharding,
and the refusals of another method, n, n0, alpha or noise seed."""
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow import certify_data  # noqa: E402
from dssn_kernels.workflow.results import MC_COLUMNS, ResultsError, read_results  # noqa: E402
from testkit import interrupted_on_call, rows_without_time, tiny_checkpoint  # noqa: E402
from testkit import run_cli as run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

TINY = ["--max", "12", "--n0", "8", "--n", "40", "--alpha", "0.01", "--no-progress",
        "--device", "cpu"]


def trivial_checkpoint(path):
    """A model that always says class 3: every image is certified with known counts."""
    ckpt = tiny_checkpoint(path)
    raw = torch.load(ckpt, weights_only=True)
    sd = raw["state_dict"]
    for k in sd:
        sd[k].zero_()
    last = [k for k in sd if k.endswith("bias")][-1]
    sd[last][3] = 5.0
    torch.save(raw, ckpt)
    return ckpt


@pytest.mark.parametrize("method", ["ssn", "uniform"])
def test_each_method_end_to_end(tmp_path, capsys, method):
    ckpt = trivial_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r.tsv"
    code, text, err = run(["certify", str(ckpt), "--out", str(out), "--method", method] + TINY,
                          capsys)
    assert code == 0, err
    rf = read_results(out)
    assert rf.meta["method"] == method
    assert rf.meta["monte_carlo"] == {"n0": 8, "n": 40, "alpha": 0.01, "noise_seed": 0}
    assert out.read_text().splitlines()[1].split("\t") == list(MC_COLUMNS)
    assert [r.idx for r in rf.rows] == list(range(12))
    lam = 0.5 * 3 ** 0.5
    # all 40 votes for class 3: Clopper-Pearson lower bound (alpha/2)^(1/40)
    p = (0.01 / 2) ** (1 / 40)
    for r in rf.rows:
        assert r.counts[3] == 40 and r.selection[3] == 8 and r.predict == 3
        assert r.radius == pytest.approx(2 * lam * (p - 0.5), rel=1e-9)
    # a row whose prediction does not follow from its counts is refused
    lines = out.read_text().splitlines(keepends=True)
    parts = lines[2].split("\t")
    parts[3] = "0.5"
    out.write_text("".join(lines[:2] + ["\t".join(parts)] + lines[3:]))
    with pytest.raises(ResultsError, match="do not follow from the counts"):
        read_results(out)


def test_not_certified_is_minus_one(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")   # random weights, n = 4: p_lower <= 1/2
    out = tmp_path / "r.tsv"
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--method", "ssn", "--max", "3",
                        "--n0", "4", "--n", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert all(r.predict == -1 and r.radius == 0.0 for r in read_results(out).rows)


def test_resume_after_interruption_gives_identical_rows(tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    opts = ["--method", "uniform"] + TINY
    assert run(["certify", str(ckpt), "--out", str(full)] + opts, capsys)[0] == 0
    monkeypatch.setattr(certify_data, "_mc_rows", interrupted_on_call(certify_data._mc_rows, 5))
    code, _, err = run(["certify", str(ckpt), "--out", str(part)] + opts, capsys)
    assert code == 130
    assert len(read_results(part).rows) == 4
    monkeypatch.undo()
    code, out, err = run(["certify", str(ckpt), "--out", str(part)] + opts, capsys)
    assert code == 0 and "certified 8 images" in out, err
    assert rows_without_time(part) == rows_without_time(full)
    # the same command with the skip of a sharded run writes the same rows again
    half = tmp_path / "half.tsv"
    assert run(["certify", str(ckpt), "--out", str(half), "--method", "uniform", "--skip", "2"]
               + TINY, capsys)[0] == 0
    assert rows_without_time(half)[2:] == rows_without_time(full)[2::2]


@pytest.mark.parametrize("change,word", [
    (["--method", "ssn"], "method"), (["--n", "41"], "monte_carlo.n"),
    (["--n0", "9"], "monte_carlo.n0"), (["--alpha", "0.02"], "monte_carlo.alpha"),
    (["--noise-seed", "1"], "monte_carlo.noise_seed"), (["--method", "dssn"], "method")])
def test_refusals(tmp_path, capsys, change, word):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r.tsv"
    opts = ["--method", "uniform", "--max", "2", "--n0", "4", "--n", "40", "--alpha", "0.01",
            "--no-progress"]
    assert run(["certify", str(ckpt), "--out", str(out)] + opts, capsys)[0] == 0
    before = out.read_bytes()
    argv = ["certify", str(ckpt), "--out", str(out), "--max", "2", "--no-progress"]
    given = dict(zip(opts[0:8:2], opts[1:8:2]))
    given.update(dict(zip(change[0::2], change[1::2])))
    if given["--method"] == "dssn":
        given = {"--method": "dssn"}
    for k, v in given.items():
        argv += [k, v]
    code, _, err = run(argv, capsys)
    assert code != 0 and word in err, err
    assert out.read_bytes() == before


def test_option_refusals(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r.tsv"
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--n", "10"], capsys)
    assert code != 0 and "--n applies to the Monte Carlo methods" in err
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--n", "10", "--n0", "4"],
                       capsys)
    assert code != 0 and "--n0 --n apply to the Monte Carlo methods" in err
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--method", "ssn",
                        "--alpha", "0.7"], capsys)
    assert code != 0 and "--alpha" in err
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--method", "ssn",
                        "--margin", "0.1"], capsys)
    assert code != 0 and "--margin" in err
    assert not out.exists()


def test_default_method_is_the_training_noise(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    raw = torch.load(ckpt, weights_only=True)
    raw["training"] = {"noise": "ssn", "stability": False}
    torch.save(raw, ckpt)
    out = tmp_path / "r.tsv"
    code, _, err = run(["certify", str(ckpt), "--out", str(out), "--max", "1", "--n0", "2",
                        "--n", "3", "--no-progress"], capsys)
    assert code == 0, err
    meta = read_results(out).meta
    assert meta["method"] == "ssn" and meta["training"] == {"noise": "ssn", "stability": False}
    from dssn_kernels.workflow.analysis import load_results
    assert load_results([str(out)])[0].label == "Independent SSN"
    # a --margin refused for that default says where the method came from
    out2 = tmp_path / "r2.tsv"
    code, _, err = run(["certify", str(ckpt), "--out", str(out2), "--margin", "0.1"], capsys)
    assert code == 2 and "the checkpoint was trained under ssn noise" in err, err
    assert "--method dssn certifies it exactly" in err and not out2.exists()


def test_two_ranks_write_the_rows_of_one_process(tmp_path, capsys):
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    single, dist = tmp_path / "single.tsv", tmp_path / "dist.tsv"
    opts = ["--method", "ssn", "--max-index", "12", "--n0", "8", "--N", "40", "--alpha", "0.01",
            "--no-progress", "--device", "cpu"]
    assert run(["certify", str(ckpt), "--out", str(single)] + opts, capsys)[0] == 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "dssn_kernels", "certify", str(ckpt),
                        "--out", str(dist)] + opts, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "over 2 ranks" in r.stdout, r.stderr[-3000:]
    assert rows_without_time(dist) == rows_without_time(single)
