"""Smoke test of the comparison demo (python -m dssn_kernels.workflow.compare_demo): the
three noises with standard and stability training, certified by their own methods, in
the Table 1 layout."""
import pytest

pytest.importorskip("sklearn")

from dssn_kernels.workflow.compare_demo import main  # noqa: E402


def test_compare_demo_tiny(tmp_path, single_process, capsys):
    res = main(["--quick", "--max-train", "32", "--max-test", "4", "--mc-images", "2",
                "--n", "10", "--no-plots", "--out", str(tmp_path)])
    rows = [line.split("|")[1].strip() for line in res["table"].splitlines()[2:]]
    assert rows == ["DSSN", "DSSN, stability", "Independent SSN", "Independent SSN, stability",
                    "Uniform (Yang et al.)", "Uniform (Yang et al.), stability"]
    assert set(res["seconds_per_image"]) == {"dssn", "ssn", "uniform"}
    assert len(res["files"]) == 6 and (tmp_path / "table.md").is_file()
    assert "dssn certify" in capsys.readouterr().out
