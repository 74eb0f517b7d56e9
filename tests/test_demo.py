"""Smoke test of the digits demo (python -m dssn_kernels.workflow.demo) and of SmallCNN."""
import pytest
import torch

pytest.importorskip("sklearn")

from dssn_kernels.workflow.demo import DEFAULT_RADII, main  # noqa: E402
from dssn_kernels.workflow.models import SmallCNN  # noqa: E402
import dssn_kernels as dk  # noqa: E402


def test_small_cnn_output_shapes():
    torch.manual_seed(0)
    for c, size, k in ((1, 8, 10), (3, 32, 10), (3, 32, 7)):
        model = SmallCNN(in_channels=c, num_classes=k, image_size=size).eval()
        x = torch.rand(5, c, size, size)
        out = model(x)
        assert out.shape == (5, k) and out.dtype == torch.float32
        # no batch-dependent layers: one image alone gives the same logits
        assert torch.allclose(model(x[:1]), out[:1], atol=1e-5)


def test_demo_quick_results(tmp_path, single_process):
    results = main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert isinstance(results, list) and len(results) >= 2
    # the workflow's files: checkpoints, result TSVs, the markdown table, the plots
    for res in results:
        assert (tmp_path / f"digits-sigma{res['sigma']:g}.pt").is_file()
        assert (tmp_path / f"digits-sigma{res['sigma']:g}.tsv").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "| DSSN |" in table and "@ σ=" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / "curves.png").is_file() and (tmp_path / "noise.png").is_file()
    for res in results:
        assert res["L"] == dk.num_variants(res["sigma"], q=16)
        assert res["max_radius"] == (res["L"] // 2) / 16
        assert res["num_test"] > 0 and res["seconds_per_image"] > 0
        clean = res["clean_accuracy"]
        assert 0.0 <= clean <= 1.0
        cert = res["certified_accuracy"]
        radii = sorted(cert)
        assert radii == sorted(float(r) for r in DEFAULT_RADII)
        accs = [cert[r] for r in radii]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert all(b <= a for a, b in zip(accs, accs[1:])), accs  # non-increasing in R
        assert cert[0.0] == clean
        assert all(cert[r] == 0.0 for r in radii if r > res["max_radius"])
    # even 3 epochs on digits beats chance by far at the smallest sigma
    assert results[0]["clean_accuracy"] > 0.5
