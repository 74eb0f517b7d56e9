"""`dssn analyze` / `dssn plot curves` on result folders in the format of the paper's
released code (synthetic folders, both kinds): the known tables, and refusals."""
import numpy as np
import pytest

from dssn_kernels import lam_from_sigma, num_variants
from dssn_kernels.workflow import cli
from dssn_kernels.workflow.analysis import best_over_sigma, load_results
from dssn_kernels.workflow.results import ResultsError

pytestmark = pytest.mark.usefixtures("single_process")


def dssn_folder(root, sigma=0.5, stabilized=False):
    """4 images: radii 3, 100, 0 steps (correct) and one wrong prediction."""
    L = num_variants(sigma, q=255)
    name = f"cifar_split_derandomized_{sigma}" + ("_stabilized" if stabilized else "")
    d = root / name
    d.mkdir()
    counts = np.zeros((4, 10))
    counts[:, 0] = L
    np.save(d / "preds.npy", counts / L)
    np.save(d / "predicted_labels.npy", np.array([1, 2, 3, 4]))
    np.save(d / "labels.npy", np.array([1.0, 2.0, 3.0, 5.0]))
    np.save(d / "radius_l1.npy", (np.array([3, 100, 0, 50]) / 255).astype(np.float32))
    np.save(d / "time_per.npy", np.array(0.25))
    np.save(d / "args.pkl", np.array([0]))   # present; never read
    return d


def mc_folder(root, noise="split", sigma=0.5):
    lam = lam_from_sigma(sigma)
    d = root / f"cifar_{noise}_{sigma}"
    d.mkdir()
    sel = np.zeros((3, 10))
    sel[0, 2], sel[1, 7], sel[2, [4, 5]] = 64, 64, 32   # image 2: a tie, argmax 4
    p = np.array([0.9, 0.75, 0.4])
    np.save(d / "preds.npy", sel / 64)
    np.save(d / "prob_lb.npy", p)
    np.save(d / "radius_l1.npy", 2 * lam * (p - 0.5))
    np.save(d / "labels.npy", np.array([2.0, 7.0, 4.0]))
    np.save(d / "time_per.npy", np.array(3.0))
    return d


def test_dssn_folder_table(tmp_path):
    d = dssn_folder(tmp_path)
    (res,) = load_results([str(d)])
    assert res.label == "DSSN (published)" and res.sigma == 0.5 and res.q == 255
    assert res.clean_accuracy() == 0.75
    assert res.certified_accuracy(0.0) == 0.75
    assert res.certified_accuracy(3 / 255) == 0.5
    assert res.certified_accuracy(0.2) == 0.25
    assert res.certified_accuracy(0.5) == 0.0


def test_mc_folder_table_and_labels(tmp_path):
    d = mc_folder(tmp_path)
    s = dssn_folder(tmp_path, stabilized=True)
    u = mc_folder(tmp_path, noise="uniform", sigma=1.0)
    res, stab, uni = load_results([str(d), str(s), str(u)])
    assert res.label == "Independent SSN (published)"
    assert stab.label == "DSSN, stability (published)"
    assert uni.label == "Uniform (Yang et al.) (published)"
    lam = lam_from_sigma(0.5)
    # images 0 and 1 certified (radii 0.8 lam, 0.5 lam), image 2 not (prob_lb < 1/2)
    assert res.clean_accuracy() == pytest.approx(2 / 3)
    assert res.certified_accuracy(0.5 * lam) == pytest.approx(2 / 3)
    assert res.certified_accuracy(0.6 * lam) == pytest.approx(1 / 3)
    assert res.certified_accuracy(0.9 * lam) == 0.0
    best = best_over_sigma([res, stab, uni], [0.5])
    assert set(best) == {"Independent SSN (published)", "DSSN, stability (published)",
                         "Uniform (Yang et al.) (published)"}


def test_cli_analyze_and_plot_folders(tmp_path, capsys):
    d, m = dssn_folder(tmp_path), mc_folder(tmp_path)
    assert cli.main(["analyze", str(d), f"mine={m}", "--radii", "0", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| DSSN (published) | 75.0% (75.0% @ σ=0.5) | 0.0% (75.0% @ σ=0.5) |" in out
    # radii 0.8 lam = 0.69 and 0.5 lam = 0.43: one of three at 0.5
    assert "| mine | 66.7% (66.7% @ σ=0.5) | 33.3% (66.7% @ σ=0.5) |" in out
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    assert cli.main(["plot", "curves", str(d), str(m), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_refusals(tmp_path):
    bad = tmp_path / "cifar_gauss_0.5"
    bad.mkdir()
    with pytest.raises(ResultsError, match="not a result folder of the paper's released code"):
        load_results([str(bad)])
    d = dssn_folder(tmp_path)
    (d / "predicted_labels.npy").unlink()
    with pytest.raises(ResultsError, match="no predicted_labels.npy"):
        load_results([str(d)])
    m = mc_folder(tmp_path)
    np.save(m / "preds.npy", np.full((3, 10), 0.013))
    with pytest.raises(ResultsError, match="not vote counts divided by 64"):
        load_results([str(m)])
    np.save(m / "preds.npy", np.zeros((2, 10)))
    with pytest.raises(ResultsError, match="do not fit one another"):
        load_results([str(m)])
    # a pickle in place of an array is refused, never unpickled
    import pickle
    m2 = tmp_path / "x" / "cifar_split_0.25"
    m2.parent.mkdir()
    mc_folder(m2.parent, sigma=0.25)
    (m2 / "labels.npy").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ResultsError, match="not a readable numpy array"):
        load_results([str(m2)])
