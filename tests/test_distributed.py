"""Sharded certification over torch.distributed: 2 CPU processes (gloo) under torchrun
write the same TSV a single process writes (time aside), and resume like it."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from dssn_kernels.workflow import cli  # noqa: E402
from dssn_kernels.workflow.results import (OutputLock, lock_path, part_path,  # noqa: E402
                                           read_results)
from testkit import rows_without_time, tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")


def torchrun(args, nproc=2):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "dssn_kernels", "certify"] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_write_what_one_process_writes(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    single, dist = tmp_path / "single.tsv", tmp_path / "dist.tsv"
    opts = ["--images-per-batch", "3", "--no-progress", "--device", "cpu"]
    assert cli.main(["certify", str(ckpt), "--out", str(single), "--max", "40"] + opts) == 0

    r = torchrun([str(ckpt), "--out", str(dist), "--max-index", "25"] + opts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 2 ranks" in r.stdout
    assert not part_path(dist, 0).exists() and not part_path(dist, 1).exists()
    # the same rows; the header records the selection (--max 25 here, 40 there)
    assert rows_without_time(dist)[1:] == rows_without_time(single)[1:2 + 25]
    assert read_results(dist).meta["selection"] == {"skip": 1, "max": 25}

    # an interrupted earlier run left a part file: it is merged, then the rest resumed
    extra = single.read_text().splitlines(keepends=True)
    part = part_path(dist, 1)
    part.write_text("".join(extra[:2] + [extra[2 + 30], extra[2 + 33]]))
    r = torchrun([str(ckpt), "--out", str(dist), "--max-index", "40"] + opts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "certified 13 images over 2 ranks" in r.stdout   # 7 on rank 0, 6 on rank 1
    assert not part.exists()
    assert rows_without_time(dist) == rows_without_time(single)
    assert [row.idx for row in read_results(dist).rows] == list(range(40))

    # a refusal in rank 0's check (the output belongs to another checkpoint) stops every
    # rank with the one-line message, and nothing is changed
    other = tiny_checkpoint(tmp_path / "other.pt", init_seed=1)
    before = dist.read_bytes()
    r = torchrun([str(other), "--out", str(dist), "--max-index", "40"] + opts)
    assert r.returncode != 0 and "holds results of a different run" in r.stderr
    # (torchrun's launcher prints its own traceback for a failed worker; ours print one line)
    assert "dssn_kernels/workflow/" not in r.stderr     # no frame of ours: no traceback
    assert dist.read_bytes() == before and not part_path(dist, 1).exists()

    # while another run holds the output's lock (rank 0 takes it), every rank stops at
    # once with rank 0's one-line refusal naming the holder; nothing is changed
    with OutputLock(dist):
        r = torchrun([str(ckpt), "--out", str(dist), "--max-index", "40"] + opts)
        assert r.returncode != 0 and f"is in use: dssn certify (pid {os.getpid()} on" in r.stderr
        assert lock_path(dist).exists()
    assert dist.read_bytes() == before and not lock_path(dist).exists()
    assert not part_path(dist, 0).exists() and not part_path(dist, 1).exists()


def test_two_processes_with_a_margin(tmp_path):
    # every rank certifies its shard with the margin: the merged file is the one a single
    # process writes, margin header and ambiguous columns included
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    single, dist = tmp_path / "single.tsv", tmp_path / "dist.tsv"
    opts = ["--images-per-batch", "3", "--no-progress", "--device", "cpu", "--margin", "0.13"]
    assert cli.main(["certify", str(ckpt), "--out", str(single), "--max", "12"] + opts) == 0
    r = torchrun([str(ckpt), "--out", str(dist), "--max-index", "12"] + opts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 2 ranks" in r.stdout and "margin 0.13" in r.stdout
    assert rows_without_time(dist) == rows_without_time(single)
    rf = read_results(dist)
    assert rf.meta["margin"] == 0.13 and sum(row.num_ambiguous for row in rf.rows) > 0
