"""Result files (dssn_kernels.workflow.results): row format, checks, torn lines, merging."""
import pytest

from dssn_kernels.workflow.data import cohen_indices
from dssn_kernels.workflow.results import (COLUMN_LINE, MARGIN_COLUMN_LINE, MARGIN_COLUMNS, ResultsError,
                                  ResultsWriter, consolidate, expected_certificate, format_row,
                                  header_line, merge_rows, parse_row, part_path, read_for_resume,
                                  read_results)

SPEC = {"sigma": 0.5, "q": 16, "seed": 0, "L": 27, "input_shape": [1, 8, 8], "num_classes": 3}
META = {"checkpoint_sha256": "ab" * 32, "spec": SPEC, "dataset": {"name": "digits", "split": "test"}}


def row(idx, label, counts, seconds=0.001):
    pred, radius = expected_certificate(counts, SPEC["q"])
    return format_row(idx, label, pred, radius, seconds, counts)


def write(path, lines, meta=META):
    cols = MARGIN_COLUMN_LINE if meta.get("margin") else COLUMN_LINE
    path.write_text(header_line(meta) + cols + "\n" + "".join(lines))


def test_certificate_from_counts_matches_design():
    # r = floor((N_A - N_B - [B < A]) / 2), ties to the lowest index
    assert expected_certificate([27, 0, 0], 16) == (0, 13 / 16)
    assert expected_certificate([0, 27, 0], 16) == (1, 13 / 16)   # runner-up 0 < 1: -1
    assert expected_certificate([10, 17, 0], 16) == (1, 3 / 16)
    assert expected_certificate([13, 13, 1], 16) == (0, 0.0)
    assert expected_certificate([1, 13, 13], 16) == (1, 0.0)


def test_row_roundtrip_is_exact():
    line = row(7, 1, [5, 20, 2])
    assert line.endswith("\n") and line.count("\t") == 6
    r = parse_row(line, "x")
    assert (r.idx, r.label, r.predict, r.correct, r.counts) == (7, 1, 1, 1, (5, 20, 2))
    assert r.radius == 7 / 16 and r.line() == line
    # the radius is written so that it reads back as the same float64, for q = 255 too
    for steps in range(0, 2000, 37):
        written = format_row(0, 0, 0, steps / 255, 0.0, [steps, 0])
        assert parse_row(written, "x").radius == steps / 255, written


def test_read_results_and_checks(tmp_path):
    p = tmp_path / "r.tsv"
    write(p, [row(0, 0, [27, 0, 0]), row(3, 2, [0, 7, 20])])
    rf = read_results(p, expect_meta=META)
    assert [r.idx for r in rf.rows] == [0, 3] and rf.torn is None

    bad = {
        "counts sum": row(1, 0, [20, 0, 0]),
        "classes": row(1, 0, [27, 0, 0, 0]),
        "predict": "1\t0\t2\t0.8125\t0\t0.1\t27,0,0\n",
        "radius": "1\t0\t0\t0.5\t1\t0.1\t27,0,0\n",
        "correct": "1\t0\t0\t0.8125\t0\t0.1\t27,0,0\n",
        "columns": "1\t0\t0\t0.8125\n",
        "number": "1\tx\t0\t0.8125\t1\t0.1\t27,0,0\n",
        "duplicate": row(0, 0, [27, 0, 0]),
    }
    for name, line in bad.items():
        write(p, [row(0, 0, [27, 0, 0]), line])
        with pytest.raises(ResultsError, match="line 4"):
            read_results(p)
    # a header of another run: refused, naming what differs
    write(p, [row(0, 0, [27, 0, 0])])
    other = dict(META, checkpoint_sha256="cd" * 32)
    with pytest.raises(ResultsError, match="different run.*checkpoint_sha256"):
        read_results(p, expect_meta=other)
    p.write_text("idx\tlabel\n")
    with pytest.raises(ResultsError, match="not a dssn result file"):
        read_results(p)


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    p = tmp_path / "r.tsv"
    good = [row(0, 0, [27, 0, 0]), row(1, 1, [0, 27, 0])]
    write(p, good + [row(2, 2, [0, 0, 27])[:9]])   # a crash mid-write
    with pytest.raises(ResultsError, match="incomplete"):
        read_results(p)
    rf = read_for_resume(p, META)
    assert [r.idx for r in rf.rows] == [0, 1]
    assert p.read_text().endswith(good[-1])        # truncated to the last complete line
    assert read_results(p).torn is None


def test_writer_appends_whole_lines(tmp_path):
    p = tmp_path / "sub" / "r.tsv"
    with ResultsWriter(p, META) as w:
        w.write([row(0, 0, [27, 0, 0])])
        w.write([row(1, 1, [0, 27, 0]), row(2, 2, [0, 0, 27])])
    with ResultsWriter(p, META) as w:              # reopening appends, no second header
        w.write([row(5, 0, [27, 0, 0])])
    assert [r.idx for r in read_results(p, expect_meta=META).rows] == [0, 1, 2, 5]


def test_merge_and_consolidate(tmp_path):
    out = tmp_path / "r.tsv"
    write(out, [row(0, 0, [27, 0, 0])])
    write(part_path(out, 0), [row(4, 1, [0, 27, 0]), row(2, 2, [0, 0, 27])])
    write(part_path(out, 3), [row(1, 1, [0, 27, 0]), row(0, 0, [27, 0, 0], seconds=9.0)])
    done = consolidate(out, META)
    assert sorted(done) == [0, 1, 2, 4]
    assert [r.idx for r in read_results(out).rows] == [0, 1, 2, 4]   # sorted by index
    assert not part_path(out, 0).exists() and not part_path(out, 3).exists()
    # the same index with a different certificate in two places is an error
    write(part_path(out, 1), [row(1, 1, [1, 26, 0])])
    with pytest.raises(ResultsError, match="index 1 has different certificates"):
        consolidate(out, META)
    assert part_path(out, 1).exists()              # nothing removed on refusal
    assert consolidate(out, META, overwrite=True) == {}
    assert not part_path(out, 1).exists() and read_results(out).rows == []


def test_merge_rows_orders_by_index():
    a = [parse_row(row(i, 0, [27, 0, 0]), "a") for i in (5, 1)]
    lines = merge_rows([("a", a, [r.line() for r in a])])
    assert [int(x.split("\t")[0]) for x in lines] == [1, 5]


def test_cohen_indices():
    assert cohen_indices(10) == list(range(10))
    assert cohen_indices(10, skip=3) == [0, 3, 6, 9]
    assert cohen_indices(10, skip=3, max_index=6) == [0, 3]
    assert cohen_indices(10, max_index=-1) == list(range(10))


# --- files certified with a margin ------------------------------------------------------

MMETA = dict(META, margin=0.05)


def mrow(idx, label, counts, amb, seconds=0.001):
    pred, radius = expected_certificate(counts, SPEC["q"], amb)
    return format_row(idx, label, pred, radius, seconds, counts,
                      num_ambiguous=SPEC["L"] - sum(counts), ambiguous=amb)


def test_margin_certificate_rule():
    # r = min over c != A of floor((N_A - N_c - amb_c - [c < A]) / 2), -1 if negative
    assert expected_certificate([27, 0, 0], 16, [0, 0, 0]) == (0, 13 / 16)
    assert expected_certificate([25, 0, 0], 16, [2, 0, 2]) == (0, 11 / 16)
    assert expected_certificate([0, 25, 0], 16, [2, 2, 0]) == (1, 11 / 16)   # 25-2-1 = 22
    assert expected_certificate([10, 9, 0], 16, [8, 8, 0]) == (0, -1 / 16)   # 10-17 < 0
    assert expected_certificate([9, 10, 0], 16, [0, 8, 8]) == (1, 0.0)      # 10-9-1 = 0
    # no ambiguous variant: the rule without a margin
    for counts in ([13, 13, 1], [1, 13, 13], [10, 17, 0]):
        assert expected_certificate(counts, 16, [0, 0, 0]) == expected_certificate(counts, 16)


def test_margin_row_roundtrip():
    line = mrow(7, 0, [20, 3, 0], [4, 0, 4])
    assert line.count("\t") == 8 and line.endswith("\t4\t4,0,4\n")
    r = parse_row(line, "x", MARGIN_COLUMNS)
    assert (r.idx, r.label, r.predict, r.correct, r.counts) == (7, 0, 0, 1, (20, 3, 0))
    assert (r.num_ambiguous, r.ambiguous) == (4, (4, 0, 4))
    assert r.radius == 8 / 16 and r.line() == line
    # not certified even at radius 0: radius -1/q, still "correct" (predict == label)
    line = mrow(8, 0, [10, 9, 0], [8, 8, 0])
    r = parse_row(line, "x", MARGIN_COLUMNS)
    assert r.radius == -1 / 16 and r.correct == 1 and "\t-0.0625\t" in line and r.line() == line
    with pytest.raises(ValueError, match="both"):
        format_row(0, 0, 0, 0.0, 0.0, [27, 0, 0], num_ambiguous=0)
    # a margin row in a file without a margin and vice versa: a column-count error
    with pytest.raises(ResultsError, match="expected 7 tab-separated columns"):
        parse_row(line, "x")
    with pytest.raises(ResultsError, match="expected 9 tab-separated columns"):
        parse_row(row(0, 0, [27, 0, 0]), "x", MARGIN_COLUMNS)


def test_margin_file_checks(tmp_path):
    p = tmp_path / "r.tsv"
    good = [mrow(0, 0, [27, 0, 0], [0, 0, 0]), mrow(1, 1, [10, 9, 0], [8, 8, 0]),
            mrow(2, 2, [0, 5, 20], [0, 2, 2])]
    write(p, good, MMETA)
    assert p.read_text().splitlines()[1] == MARGIN_COLUMN_LINE
    rf = read_results(p, expect_meta=MMETA)
    assert [r.num_ambiguous for r in rf.rows] == [0, 8, 2]
    assert [r.radius for r in rf.rows] == [13 / 16, -1 / 16, 6 / 16]
    bad = {
        # sum(counts) + num_ambiguous must be L
        "sum": "3\t0\t0\t0.8125\t1\t0.1\t27,0,0\t1\t1,1,0\n",
        "sum2": "3\t0\t0\t0.5\t1\t0.1\t20,0,0\t3\t3,3,0\n",
        # an ambiguous variant is in at least two classes, each class at most num_ambiguous
        "too few": "3\t0\t0\t0.625\t1\t0.1\t23,0,0\t4\t4,2,0\n",
        "too many": "3\t0\t0\t0.5\t1\t0.1\t23,0,0\t4\t5,5,0\n",
        "classes": "3\t0\t0\t0.8125\t1\t0.1\t27,0,0\t0\t0,0,0,0\n",
        "negative": "3\t0\t0\t0.8125\t1\t0.1\t27,0,0\t0\t0,-1,1\n",
        # the radius must follow the margin rule (-1/q here), not the plain one
        "radius": "3\t0\t0\t0.0\t1\t0.1\t10,9,0\t8\t8,8,0\n",
        "columns": row(3, 0, [27, 0, 0]),
        "number": "3\t0\t0\t0.8125\t1\t0.1\t27,0,0\tx\t0,0,0\n",
    }
    for name, line in bad.items():
        write(p, good[:1] + [line], MMETA)
        with pytest.raises(ResultsError, match="line 4"):
            read_results(p)
    # the column header must be the margin one
    p.write_text(header_line(MMETA) + COLUMN_LINE + "\n")
    with pytest.raises(ResultsError, match="column header"):
        read_results(p)


def test_margin_resume_and_refusal(tmp_path):
    p = tmp_path / "r.tsv"
    with ResultsWriter(p, MMETA) as w:
        w.write([mrow(0, 0, [27, 0, 0], [0, 0, 0]), mrow(1, 1, [10, 9, 0], [8, 8, 0])])
    write(part_path(p, 1), [mrow(4, 2, [0, 5, 20], [0, 2, 2])], MMETA)
    before = p.read_bytes()
    for meta, what in ((META, "--margin 0.05, this run uses --margin 0"),
                       (dict(META, margin=0.1), "--margin 0.05, this run uses --margin 0.1")):
        with pytest.raises(ResultsError, match=what):
            consolidate(p, meta)
        assert p.read_bytes() == before and part_path(p, 1).exists()
    assert sorted(consolidate(p, MMETA)) == [0, 1, 4]
    # a file without a margin refuses a run with one, naming both margins
    q = tmp_path / "plain.tsv"
    write(q, [row(0, 0, [27, 0, 0])])
    with pytest.raises(ResultsError, match="--margin 0, this run uses --margin 0.05"):
        read_for_resume(q, MMETA)


SEL = dict(META, selection={"skip": 1, "max": 6})


def test_selection_in_the_header(tmp_path):
    from dssn_kernels.workflow.results import selection_within

    assert selection_within({"skip": 1, "max": 4}, {"skip": 1, "max": 6})      # a larger --max
    assert selection_within({"skip": 2, "max": 6}, {"skip": 1, "max": 6})      # every image
    assert not selection_within({"skip": 1, "max": 6}, {"skip": 1, "max": 4})  # rows beyond
    assert not selection_within({"skip": 1, "max": 4}, {"skip": 2, "max": 6})  # odd indices
    assert not selection_within({"skip": 0, "max": 4}, {"skip": 1, "max": 6})  # malformed
    p = tmp_path / "r.tsv"
    write(p, [row(0, 0, [27, 0, 0]), row(1, 1, [0, 27, 0])], dict(META, selection={"skip": 1, "max": 2}))
    before = p.read_bytes()
    # another selection that does not hold the file's images: refused, nothing changed
    for sel, what in (({"skip": 2, "max": 6}, "--skip 1 --max 2: 2 images; this run: --skip 2"),
                      ({"skip": 1, "max": 1}, "rerun with --skip 1 --max 2")):
        with pytest.raises(ResultsError, match="another selection of images.*" + what):
            consolidate(p, dict(META, selection=sel))
        assert p.read_bytes() == before
    # a larger one resumes the file, whose header then records it
    assert sorted(consolidate(p, SEL)) == [0, 1]
    assert read_results(p, expect_meta=SEL).meta == SEL
    assert read_results(p).lines == [row(0, 0, [27, 0, 0]), row(1, 1, [0, 27, 0])]
    # a file of an older version (no selection): resumed when its rows are in the selection
    write(p, [row(0, 0, [27, 0, 0]), row(7, 1, [0, 27, 0])])
    with pytest.raises(ResultsError, match="outside this run's selection.*index 7"):
        consolidate(p, SEL)
    write(p, [row(0, 0, [27, 0, 0]), row(5, 1, [0, 27, 0])])
    assert sorted(consolidate(p, SEL)) == [0, 5] and read_results(p).meta == SEL


def test_torn_header_or_column_line_and_empty_files(tmp_path):
    p = tmp_path / "r.tsv"
    header = header_line(META)
    for text, what in ((header[:30], "line 1, the header, is incomplete"),
                       (header[:5], "line 1, the header, is incomplete"),
                       (header + COLUMN_LINE[:5], "line 2, the column line, is incomplete")):
        p.write_text(text)
        with pytest.raises(ResultsError, match=what + ".*--overwrite"):
            read_results(p)
    # on resume a torn column line (no rows) starts the file again; a torn header is refused
    assert read_for_resume(p, META) is None and not p.exists()
    p.write_text(header[:30])
    with pytest.raises(ResultsError, match="line 1, the header"):
        read_for_resume(p, META)
    assert p.read_text() == header[:30]
    # an empty file: refused by readers, started again on resume (it holds nothing)
    p.write_text("")
    with pytest.raises(ResultsError, match="is empty.*--overwrite"):
        read_results(p)
    assert consolidate(p, META) == {} and read_results(p).meta == META


def test_crlf_line_endings_are_named_not_called_a_bad_column_line(tmp_path):
    from dssn_kernels.workflow.results import write_atomic

    p = tmp_path / "r.tsv"
    write_atomic(p, META, [])
    good = p.read_bytes()
    p.write_bytes(good.replace(b"\n", b"\r\n"))
    with pytest.raises(ResultsError, match=r"carriage returns \(Windows CRLF line endings\?\)"):
        read_results(p)
    with pytest.raises(ResultsError, match="dos2unix"):
        read_for_resume(p, META)
    assert p.read_bytes() == good.replace(b"\n", b"\r\n")


def test_write_atomic_names_the_users_file(tmp_path):
    from dssn_kernels.workflow.results import write_atomic

    with pytest.raises(ResultsError, match=f"cannot write {tmp_path / 'no' / 'r.tsv'}: ") as info:
        write_atomic(tmp_path / "no" / "r.tsv", META, [])
    assert "merge-tmp" not in str(info.value)


def test_output_lock(tmp_path):
    import json
    import os

    from dssn_kernels.workflow.results import OutputLock, lock_path

    out = tmp_path / "r.tsv"
    with OutputLock(out) as lock:
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        # a second lock (another open file: flock excludes it even in this process)
        with pytest.raises(ResultsError, match=rf"r.tsv is in use: dssn certify \(pid "
                                               rf"{os.getpid()} on .*, since "):
            OutputLock(out).acquire()
        assert lock._fd is not None
    assert not lock_path(out).exists()             # released: the lock file is removed
    # a lock file left by a dead holder is locked by nobody: taken over
    lock_path(out).write_text('{"pid": 999999, "host": "elsewhere"}\n')
    with OutputLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()
    OutputLock(out).release()                      # releasing an unheld lock: nothing
