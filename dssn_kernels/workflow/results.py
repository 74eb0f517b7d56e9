"""Certification result files: Cohen et al.'s TSV columns plus the vote counts, under a
header that names the run, written a batch at a time so a crash loses at most the batch
in flight, and resumable.

Layout::

    # dssn-results/1 {"checkpoint_sha256": "...", "dataset": {...}, "selection": {"max": 540, "skip": 1}, "spec": {...}}
    idx	label	predict	radius	correct	time	counts
    0	3	3	0.8125	1	0.000412	0,0,0,27,0,0,0,0,0,0

``selection`` records the images the run certifies: every ``skip``-th index below
``max`` (Cohen et al.'s --skip and --max; --max -1 is recorded as the split's size).
``radius`` is the certified L1 radius on the [0, 1] scale, steps/q, written as the
shortest decimal that reads back to the same float64; ``time`` the seconds spent per
image (the batch's wall time divided by its images); ``counts`` the L votes per class;
``correct`` is 1 when predict == label, whatever the radius.

With a margin tau > 0 (``dssn certify --margin TAU``, ``certify(..., margin=tau)``) the
header also holds ``"margin": tau`` and every row two more columns::

    # dssn-results/1 {"checkpoint_sha256": "...", "dataset": {...}, "margin": 0.05, "spec": {...}}
    idx	label	predict	radius	correct	time	counts	num_ambiguous	ambiguous
    0	3	3	0.6875	1	0.000412	0,0,0,25,0,0,0,0,0,0	2	0,0,0,2,0,2,0,0,0,0

``num_ambiguous`` is the number of variants whose top logit beat the runner-up by less
than tau (they vote for no class, so sum(counts) + num_ambiguous == L) and ``ambiguous``
the per-class counts of the classes each of them could win (Certificate.ambiguous). The
radius follows the margin rule (decisions.certified_steps) and is -1/q where the
prediction is not certified even at radius 0. Without a margin (tau = 0) the header has
no ``margin`` key and the rows have the seven columns above: the format is unchanged.

Rules, checked whenever a file is read: the first line is the header and must match the
run (else the file belongs to another checkpoint, spec, data split or margin: refused,
nothing touched); every row parses, its counts (plus num_ambiguous under a margin) sum
to L over num_classes classes, and its prediction, radius and correct flag are those the
counts, ambiguous counts and label give (else refused as corrupt, naming the line); no
index appears twice. A last line without its newline is a write torn by a crash: on
resume it is dropped (the file is truncated to its last complete line, with a warning)
and that image is certified again. A run may resume a file of another selection only
when that selection lies within its own (a larger --max, or --skip 1 after --skip 2):
the header then records the run's; any other selection is refused, so one file never
mixes two. A torn header or column line holds no results; a file certified by a
version without ``selection`` is resumed when its rows all lie in the run's selection.

While a run writes a file it holds ``<file>.lock`` (OutputLock): a second run on the
same file stops at once, naming the first.

Monte Carlo certification (``dssn certify --method ssn|uniform``, baselines.py) writes
the same file with ``"method"`` and ``"monte_carlo": {"n0", "n", "alpha",
"noise_seed"}`` in the header, and Cohen et al.'s columns with the n estimation counts
and the n0 selection counts::

    # dssn-results/1 {..., "method": "ssn", "monte_carlo": {"alpha": 0.001, "n": 100000, "n0": 64, "noise_seed": 0}, ...}
    idx	label	predict	radius	correct	time	counts	selection
    0	3	3	0.412	1	1.93	0,2,0,99871,...	0,0,0,64,...

``predict`` is -1 (radius 0) where the Clopper-Pearson lower bound on p_A (the n counts
of the argmax of the selection counts, lowest index on ties) is <= 1/2; each row's
prediction and radius are checked against its counts as for DSSN rows.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..decisions import certified_steps

FORMAT = "dssn-results/1"
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "counts")
COLUMN_LINE = "\t".join(COLUMNS)
MARGIN_COLUMNS = COLUMNS + ("num_ambiguous", "ambiguous")   # files certified with a margin
MARGIN_COLUMN_LINE = "\t".join(MARGIN_COLUMNS)
MC_COLUMNS = COLUMNS + ("selection",)   # Monte Carlo files: the n0 selection counts
HEADER_PREFIX = f"# {FORMAT} "


def meta_margin(meta: dict) -> float:
    """The margin tau a header records (0 when it has none: a file without a margin)."""
    m = meta.get("margin", 0) if isinstance(meta, dict) else 0
    return float(m) if isinstance(m, (int, float)) and not isinstance(m, bool) else 0.0


def meta_monte_carlo(meta: dict) -> dict | None:
    """The Monte Carlo parameters a header records (n0, n, alpha, noise_seed), or None
    for a file of exact DSSN certificates."""
    mc = meta.get("monte_carlo") if isinstance(meta, dict) else None
    return mc if isinstance(mc, dict) else None


def columns_for(meta: dict) -> tuple:
    """The columns of a file with this header: MARGIN_COLUMNS under a margin, MC_COLUMNS
    for Monte Carlo certificates."""
    if meta_monte_carlo(meta) is not None:
        return MC_COLUMNS
    return MARGIN_COLUMNS if meta_margin(meta) > 0 else COLUMNS


def column_line(meta: dict) -> str:
    return "\t".join(columns_for(meta))


class ResultsError(ValueError):
    """A result file is corrupt or belongs to a different run."""


@dataclass(frozen=True)
class Row:
    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float
    counts: tuple
    num_ambiguous: int | None = None   # margin files only
    ambiguous: tuple | None = None     # margin files only
    selection: tuple | None = None     # Monte Carlo files only: the n0 selection counts

    def line(self) -> str:
        return format_row(self.idx, self.label, self.predict, self.radius, self.time, self.counts,
                          num_ambiguous=self.num_ambiguous, ambiguous=self.ambiguous,
                          selection=self.selection)

    def key(self) -> tuple:
        """Everything but the time: equal keys mean the same certificate."""
        return (self.idx, self.label, self.predict, self.radius, self.correct, self.counts,
                self.num_ambiguous, self.ambiguous, self.selection)


def format_row(idx: int, label: int, predict: int, radius: float, seconds: float, counts, *,
               num_ambiguous=None, ambiguous=None, selection=None) -> str:
    """One row line. ``num_ambiguous`` and ``ambiguous`` (per-class counts) are the two
    extra columns of a file certified with a margin: give both or neither. ``selection``:
    the n0 selection counts, the extra column of a Monte Carlo file."""
    if (num_ambiguous is None) != (ambiguous is None):
        raise ValueError("give both num_ambiguous and ambiguous (a margin row) or neither")
    correct = int(int(predict) == int(label))
    line = (f"{int(idx)}\t{int(label)}\t{int(predict)}\t{float(radius)!r}\t{correct}\t"
            f"{float(seconds):.6f}\t{','.join(str(int(c)) for c in counts)}")
    if num_ambiguous is not None:
        line += f"\t{int(num_ambiguous)}\t{','.join(str(int(c)) for c in ambiguous)}"
    if selection is not None:
        line += f"\t{','.join(str(int(c)) for c in selection)}"
    return line + "\n"


def header_line(meta: dict) -> str:
    return HEADER_PREFIX + json.dumps(meta, sort_keys=True, separators=(", ", ": ")) + "\n"


def expected_certificate(counts, q: int, ambiguous=None) -> tuple[int, float]:
    """(prediction, radius) from one row of votes (K >= 2 classes): the certificate of
    docs/DESIGN.md, "The certificate", by the rule certify uses
    (decisions.certified_steps). With the per-class ``ambiguous`` counts of a margin
    vote: the margin rule, radius -1/q where not certified even at radius 0."""
    amb = None if ambiguous is None else [tuple(ambiguous)]
    (pred, steps), = _certified_rows([tuple(counts)], amb)
    return pred, steps / q


def _certified_rows(counts, ambiguous=None) -> list[tuple[int, int]]:
    """(prediction, steps) of rows of votes (tuples of one length K >= 2; ``ambiguous``:
    one per row, or None), by one call of decisions.certified_steps."""
    amb = None if ambiguous is None else torch.from_numpy(np.array(ambiguous, dtype=np.int64))
    top, steps = certified_steps(torch.from_numpy(np.array(counts, dtype=np.int64)), amb)
    return list(zip(top.tolist(), steps.tolist()))


def _certificates(lines, columns) -> dict:
    """{(counts, ambiguous): (prediction, steps)} for the row lines of a file, computed in
    one batch per K (rows that do not read or fit are left to check_row)."""
    groups = {}
    if columns == MC_COLUMNS:
        return {}   # Monte Carlo rows: check_row computes their certificates
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != len(columns):
            continue
        try:
            counts = _ints(parts[6])
            amb = _ints(parts[8]) if len(parts) > len(COLUMNS) else None
        except ValueError:
            continue
        K = len(counts)
        if K >= 2 and (amb is None or len(amb) == K) \
                and all(0 <= c < 2 ** 62 for c in counts + (amb or ())):
            groups.setdefault((K, amb is None), set()).add((counts, amb))
    out = {}
    for (_, plain), keys in groups.items():
        keys = list(keys)
        amb = None if plain else [a for _, a in keys]
        out.update(zip(keys, _certified_rows([c for c, _ in keys], amb)))
    return out


def _ints(text: str) -> tuple:
    return tuple(int(c) for c in text.split(","))


def parse_row(line: str, where: str, columns: tuple = COLUMNS) -> Row:
    """A row line of a file with these ``columns`` (COLUMNS, or MARGIN_COLUMNS)."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != len(columns):
        raise ResultsError(f"{where}: expected {len(columns)} tab-separated columns "
                           f"({' '.join(columns)}), got {len(parts)}: {line.rstrip()[:80]!r}")
    try:
        idx, label, predict, correct = (int(parts[i]) for i in (0, 1, 2, 4))
        radius, seconds = float(parts[3]), float(parts[5])
        counts = _ints(parts[6])
        num_ambiguous = ambiguous = selection = None
        if columns == MC_COLUMNS:
            selection = _ints(parts[7])
        elif len(parts) > len(COLUMNS):
            num_ambiguous, ambiguous = int(parts[7]), _ints(parts[8])
    except ValueError:
        raise ResultsError(f"{where}: unreadable row {line.rstrip()[:80]!r}") from None
    return Row(idx, label, predict, radius, correct, seconds, counts, num_ambiguous, ambiguous,
               selection)


def mc_certificate(counts, selection, lam: float, alpha: float) -> tuple[int, float, float]:
    """(prediction, radius, p_lower) of Monte Carlo votes: the top class is the argmax of
    the selection counts (lowest index on ties), p_lower the Clopper-Pearson bound of its
    share of the n estimation counts; -1 and radius 0 where p_lower <= 1/2
    (baselines.py, Yang et al.'s certification)."""
    from .baselines import ABSTAIN, clopper_pearson_lower

    top = max(range(len(selection)), key=lambda c: (selection[c], -c))
    p = clopper_pearson_lower(int(counts[top]), int(sum(counts)), float(alpha))
    if p > 0.5:
        return top, float(2 * lam * (p - 0.5)), p
    return ABSTAIN, 0.0, p


def _mc_expected(row: Row, sel, lam: float, alpha: float) -> tuple[int, float]:
    """mc_certificate's (prediction, radius), by the fast Beta quantile (the same bound
    up to ~1e-12) and by mc_certificate itself near p_lower = 1/2, where it decides: the
    root finding of scipy's binomtest takes milliseconds a row, too slow for reading
    large files."""
    from scipy.special import betaincinv

    from .baselines import ABSTAIN

    top = max(range(len(sel)), key=lambda c: (sel[c], -c))
    k, n = int(row.counts[top]), int(sum(row.counts))
    p = float(betaincinv(k, n - k + 1, alpha / 2)) if k > 0 else 0.0
    if abs(p - 0.5) < 1e-9:
        return mc_certificate(row.counts, sel, lam, alpha)[:2]
    return (top, float(2 * lam * (p - 0.5))) if p > 0.5 else (ABSTAIN, 0.0)


def _check_mc_row(row: Row, spec: dict, mc: dict, where: str) -> None:
    from ..spec import lam_from_sigma

    k = spec.get("num_classes")
    sel = row.selection or ()
    if row.idx < 0 or row.label < 0 or any(c < 0 for c in row.counts + sel):
        raise ResultsError(f"{where}: negative index, label or count")
    if k is not None and (len(row.counts) != k or len(sel) != k):
        raise ResultsError(f"{where}: {len(row.counts)} counts and {len(sel)} selection "
                           f"counts, expected {k} classes")
    for name, got, want in (("counts", sum(row.counts), mc.get("n")),
                            ("selection counts", sum(sel), mc.get("n0"))):
        if want is not None and got != want:
            raise ResultsError(f"{where}: the {name} sum to {got}, expected {want}")
    lam = (float(spec["lam"]) if "lam" in spec else
           lam_from_sigma(float(spec["sigma"])) if "sigma" in spec else None)
    if lam is not None and mc.get("alpha") is not None and len(sel) >= 2:
        pred, radius = _mc_expected(row, sel, lam, float(mc["alpha"]))
        if row.predict != pred or not math.isclose(row.radius, radius, rel_tol=1e-9,
                                                   abs_tol=1e-12):
            raise ResultsError(f"{where}: predict={row.predict} radius={row.radius!r} do not "
                               f"follow from the counts (predict={pred} radius={radius!r})")
    if row.correct != int(row.predict == row.label):
        raise ResultsError(f"{where}: correct={row.correct} but predict={row.predict}, "
                           f"label={row.label}")


def check_row(row: Row, spec: dict, where: str, certificates: dict | None = None,
              monte_carlo: dict | None = None) -> None:
    """Refuses (ResultsError) a row that the run could not have written. ``certificates``:
    precomputed certificates of the rows (_certificates), else each is computed here.
    ``monte_carlo``: the header's Monte Carlo parameters (a Monte Carlo row)."""
    if monte_carlo is not None:
        return _check_mc_row(row, spec, monte_carlo, where)
    L, q, k = spec.get("L"), spec.get("q"), spec.get("num_classes")
    margin = row.num_ambiguous is not None
    if row.idx < 0 or row.label < 0 or any(c < 0 for c in row.counts):
        raise ResultsError(f"{where}: negative index, label or count")
    if k is not None and len(row.counts) != k:
        raise ResultsError(f"{where}: {len(row.counts)} vote counts, expected {k} classes")
    if margin:
        n, amb = row.num_ambiguous, row.ambiguous
        if n < 0 or any(c < 0 for c in amb):
            raise ResultsError(f"{where}: negative ambiguous count")
        if len(amb) != len(row.counts):
            raise ResultsError(f"{where}: {len(amb)} ambiguous counts, expected one per class "
                               f"({len(row.counts)})")
        # each ambiguous variant could go to at least two classes, and is one variant
        if any(c > n for c in amb) or sum(amb) < 2 * n:
            raise ResultsError(f"{where}: ambiguous counts {','.join(map(str, amb))} do not fit "
                               f"num_ambiguous={n} (each at most it, summing to at least 2x it)")
        if L is not None and sum(row.counts) + n != L:
            raise ResultsError(f"{where}: the votes sum to {sum(row.counts)} plus "
                               f"num_ambiguous={n}, expected L={L}")
    elif L is not None and sum(row.counts) != L:
        raise ResultsError(f"{where}: the votes sum to {sum(row.counts)}, expected L={L}")
    if q is not None and len(row.counts) >= 2:
        known = (certificates or {}).get((row.counts, row.ambiguous))
        if known is not None:
            pred, radius = known[0], known[1] / q
        else:
            try:
                pred, radius = expected_certificate(row.counts, q, row.ambiguous)
            except (OverflowError, RuntimeError):   # counts beyond int64
                raise ResultsError(f"{where}: vote counts out of range") from None
        if (row.predict, row.radius) != (pred, radius):
            raise ResultsError(f"{where}: predict={row.predict} radius={row.radius!r} do not "
                               f"follow from the counts (predict={pred} radius={radius!r})")
    if row.correct != int(row.predict == row.label):
        raise ResultsError(f"{where}: correct={row.correct} but predict={row.predict}, "
                           f"label={row.label}")


@dataclass
class ResultsFile:
    path: Path
    meta: dict
    rows: list = field(default_factory=list)
    lines: list = field(default_factory=list)      # the raw row lines, newline included
    valid_bytes: int = 0                           # length up to the last complete line
    torn: str | None = None                        # a torn last line, if any

    def by_index(self) -> dict:
        return {r.idx: r for r in self.rows}

    def source(self, where: str | None = None) -> tuple:
        """(where, rows, lines), a source for merge_rows; ``where`` defaults to the path."""
        return (str(self.path) if where is None else where, self.rows, self.lines)


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if a != b:
        def short(v):
            s = json.dumps(v)
            return s[:13] + '..."' if len(s) > 24 and s.startswith('"') else s
        return [f"{prefix.rstrip('.')} {short(a)} (file) vs {short(b)} (this run)"]
    return []


def selection(skip: int, stop: int) -> dict:
    """The header's record of the images a run certifies: Cohen et al.'s every ``skip``-th
    index below ``stop`` (--max, or the size of the split for -1)."""
    return {"skip": int(skip), "max": int(stop)}


def _selection_range(sel) -> range | None:
    if not isinstance(sel, dict):
        return None
    skip, stop = sel.get("skip"), sel.get("max")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (skip, stop)):
        return None
    return range(0, stop, skip) if skip >= 1 and stop >= 0 else None


def in_selection(idx: int, sel: dict) -> bool:
    r = _selection_range(sel)
    return r is not None and idx in r


def selection_within(inner, outer) -> bool:
    """True when every index of the selection ``inner`` is in ``outer`` (a run may resume
    a file of a smaller selection, e.g. a smaller --max: the file then gets ``outer``)."""
    a, b = _selection_range(inner), _selection_range(outer)
    return a is not None and b is not None and all(i in b for i in a)


def describe_selection(sel) -> str:
    r = _selection_range(sel)
    if r is None:
        return f"selection {json.dumps(sel)}"
    return f"--skip {r.step} --max {r.stop}: {len(r)} images"


def selection_options(sel) -> str:
    r = _selection_range(sel)
    return "the same --skip and --max" if r is None else f"--skip {r.step} --max {r.stop}"


def _check_spec(spec: dict, where: str) -> None:
    """Refuses (ResultsError) a header spec whose numbers the rows are checked against
    (and analyze computes with) are not numbers of their range."""
    for key, low in (("q", 1), ("L", 1), ("num_classes", 2), ("seed", 0)):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ResultsError(f"{where} has spec.{key} = {json.dumps(v)}, not an integer >= {low}")
    for key in ("sigma", "lam"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or v <= 0):
            raise ResultsError(f"{where} has spec.{key} = {json.dumps(v)}, not a positive number")


def read_results(path, *, expect_meta: dict | None = None, allow_torn: bool = False) -> ResultsFile:
    """Reads and checks a result file (see the module doc for the rules). With
    ``expect_meta`` the header must equal it, except that when ``expect_meta`` holds a
    selection the file's may be one within it (selection_within; a file without one must
    hold only indices of it): the caller then rewrites the header. A torn last line is an
    error unless ``allow_torn``, when it is reported in ``.torn`` and left out of the
    rows."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ResultsError(f"{path} is a folder, not a result file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{path} is corrupt: not UTF-8 text (byte {exc.start})") from None
    if "\r" in text:
        raise ResultsError(f"{path} has carriage returns (Windows CRLF line endings?), which "
                           "dssn never writes: the file was edited or converted; convert it "
                           "back (e.g. dos2unix); nothing was changed")
    lines = text.splitlines(keepends=True)
    if not lines:
        raise ResultsError(f"{path} is empty (a run that stopped before writing its header?); "
                           "pass --overwrite to start it again")
    if len(lines) == 1 and not lines[0].endswith("\n") and (
            lines[0].startswith(HEADER_PREFIX) or HEADER_PREFIX.startswith(lines[0])):
        raise ResultsError(f"{path} is corrupt: line 1, the header, is incomplete (a write "
                           "torn by a crash); it holds no results: pass --overwrite to start "
                           "it again")
    if not lines[0].startswith(HEADER_PREFIX) or not lines[0].endswith("\n"):
        raise ResultsError(f"{path} is not a dssn result file (line 1 must start with "
                           f"{HEADER_PREFIX.strip()!r}); refusing to touch it")
    try:
        meta = json.loads(lines[0][len(HEADER_PREFIX):])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise ResultsError(f"{path} is corrupt: line 1 has an unreadable header ({exc})") from None
    if expect_meta is not None and meta_margin(meta) != meta_margin(expect_meta):
        raise ResultsError(f"{path} holds results certified with --margin "
                           f"{meta_margin(meta):g}, this run uses --margin "
                           f"{meta_margin(expect_meta):g}; nothing was changed: rerun with "
                           f"--margin {meta_margin(meta):g} to resume it, choose another --out, "
                           "or pass --overwrite to replace it")
    # the selection of images may grow (selection_within); everything else must be equal
    want = None if expect_meta is None else expect_meta.get("selection")
    if want is not None:
        others = ({k: v for k, v in meta.items() if k != "selection"},
                  {k: v for k, v in expect_meta.items() if k != "selection"})
    else:
        others = (meta, expect_meta)
    if expect_meta is not None and others[0] != others[1]:
        diffs = "; ".join(_diff(*others)) or "header differs"
        raise ResultsError(f"{path} holds results of a different run ({diffs}); nothing was "
                           "changed: choose another --out, or pass --overwrite to replace it")
    have = meta.get("selection")
    if want is not None and have is not None and not selection_within(have, want):
        raise ResultsError(
            f"{path} holds another selection of images ({describe_selection(have)}; this run: "
            f"{describe_selection(want)}, which does not include them all); nothing was "
            f"changed: rerun with {selection_options(have)} (or a larger --max) to resume it, "
            "choose another --out, or pass --overwrite to replace it")
    torn = None
    if lines[-1] and not lines[-1].endswith("\n"):
        torn = lines.pop()
        if not allow_torn and len(lines) == 1:
            raise ResultsError(f"{path} is corrupt: line 2, the column line, is incomplete (a "
                               "write torn by a crash); it holds no results: rerun the certify "
                               "command to resume it, or pass --overwrite to start it again")
        if not allow_torn:
            raise ResultsError(f"{path} is corrupt: line {len(lines) + 1} is incomplete "
                               f"(a write torn by a crash): {torn[:60]!r}; rerun the certify "
                               "command to resume it (that line is dropped)")
    columns = columns_for(meta)
    if len(lines) < 2 or lines[1].rstrip("\n") != "\t".join(columns):
        if len(lines) >= 2 or torn is None:
            raise ResultsError(f"{path} is corrupt: line 2 must be the column header "
                               f"{chr(9).join(columns)!r}")
    spec = meta.get("spec", {}) if isinstance(meta.get("spec"), dict) else {}
    _check_spec(spec, f"{path} is corrupt: line 1, the header,")
    out = ResultsFile(path=path, meta=meta, torn=torn)
    seen = {}
    certificates = _certificates(lines[2:], columns) if spec.get("q") is not None else {}
    for n, line in enumerate(lines[2:], start=3):
        where = f"{path} is corrupt: line {n}"
        row = parse_row(line, where, columns)
        check_row(row, spec, where, certificates, meta_monte_carlo(meta))
        if row.idx in seen:
            raise ResultsError(f"{where}: index {row.idx} already on line {seen[row.idx]}")
        seen[row.idx] = n
        out.rows.append(row)
        out.lines.append(line)
    if want is not None and have is None:   # a file of an older version: its rows must fit
        stray = [r.idx for r in out.rows if not in_selection(r.idx, want)]
        if stray:
            raise ResultsError(
                f"{path} holds images outside this run's selection ({describe_selection(want)}"
                f"), e.g. index {stray[0]}; nothing was changed: choose another --out, or pass "
                "--overwrite to replace it")
    out.valid_bytes = len("".join(lines).encode("utf-8"))
    return out


class ResultsWriter:
    """Appends whole rows to a result file: each ``write`` is one ``write`` call of
    complete lines followed by flush and fsync, so a crash loses at most that batch."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", encoding="utf-8", newline="\n")
        if new:
            self._f.write(header_line(meta) + column_line(meta) + "\n")
            self._sync()

    def _sync(self):
        self._f.flush()
        os.fsync(self._f.fileno())

    def write(self, lines) -> None:
        text = "".join(lines)
        if text:
            self._f.write(text)
            self._sync()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def part_path(out, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}")


def leftover_parts(out) -> list[Path]:
    """Part files ``<out>.rank<r>`` left by an interrupted distributed run."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    prefix = out.name + ".rank"
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def _warn(msg: str) -> None:
    print(f"dssn: warning: {msg}", file=sys.stderr, flush=True)


def read_for_resume(path, meta: dict) -> ResultsFile | None:
    """The existing rows of ``path`` (None if there is no file), after checking header and
    rows. Refuses (ResultsError) without touching the file if it belongs to another run or
    is corrupt; truncates a torn last line (the only change it ever makes)."""
    path = Path(path)
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return None   # (an empty file: a run that stopped before its header; nothing to lose)
    rf = read_results(path, expect_meta=meta, allow_torn=True)
    if rf.torn is not None:
        _warn(f"{path}: dropping an incomplete last line (a write torn by a crash): "
              f"{rf.torn[:60]!r}; that image is certified again")
        with open(path, "r+b") as f:
            f.truncate(rf.valid_bytes)
            f.flush()
            os.fsync(f.fileno())
        if rf.valid_bytes < len(header_line(meta).encode()) + len(column_line(meta)) + 1:
            path.unlink()  # the header itself was torn: start the file afresh
            return None
    return rf


def merge_rows(sources) -> list[str]:
    """Row lines of several sources, one per index, sorted by index. The same index in
    two sources must hold the same certificate (time aside): the first line wins."""
    merged = {}
    for where, rows, lines in sources:
        for row, line in zip(rows, lines):
            have = merged.get(row.idx)
            if have is None:
                merged[row.idx] = (row, line, where)
            elif have[0].key() != row.key():
                raise ResultsError(f"index {row.idx} has different certificates in {have[2]} "
                                   f"and {where}")
    return [merged[i][1] for i in sorted(merged)]


@contextlib.contextmanager
def replaced_atomically(path, mode: str = "w", *, tmp_suffix: str = ".tmp"):
    """``with replaced_atomically(path, "wb") as f: ...`` writes ``f`` to ``path`` through a
    temporary file in the same folder and a rename (os.replace): ``path`` is the old file
    or the whole new one, never part of it, whatever interrupts the write. The temporary
    file is new (created exclusively, named ``.NAME.<pid>.<random>`` + ``tmp_suffix``,
    flushed to disk before the rename), so it never replaces or removes another file,
    another run's temporary file included; it is removed on any failure (an interruption
    too). Errors (OSError included) propagate unchanged."""
    path = Path(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    tmp = None
    try:
        for _ in range(100):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{tmp_suffix}")
            try:
                f = open(tmp, mode.replace("w", "x"), **text)
                break
            except FileExistsError:
                tmp = None
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary file name")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def write_text_atomic(path, text: str, *, tmp_suffix: str = ".tmp") -> None:
    """Writes ``text`` to ``path`` through replaced_atomically. An OSError becomes a
    ResultsError naming the user's file, not the temporary one."""
    try:
        with replaced_atomically(path, tmp_suffix=tmp_suffix) as f:
            f.write(text)
    except OSError as exc:
        raise ResultsError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_atomic(path, meta: dict, lines) -> None:
    """Writes header and ``lines`` to ``path`` through a temporary file and a rename
    (write_text_atomic)."""
    write_text_atomic(path, header_line(meta) + column_line(meta) + "\n" + "".join(lines),
                      tmp_suffix=".merge-tmp")


def lock_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


class OutputLock:
    """An exclusive lock on an output for one run (a result file of ``dssn certify``, a
    checkpoint of ``dssn train`` / ``train-denoiser``): ``<out>.lock`` beside it, held with
    flock(2) on an open descriptor, so the OS releases it when the process ends, crash and
    ``kill -9`` included. A lock file left behind by a dead process is locked by nobody
    and is simply taken over; it names the holder (pid, host, start time) for the one-line
    refusal a second process gets. Removed on release. Where flock is unavailable
    (Windows, a file system without locks) the run goes on unlocked, with a warning."""

    def __init__(self, out, what: str = "dssn certify"):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.what = what
        self._fd = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ResultsError(f"cannot lock {self.out}: {self.path}: "
                                   f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_lock(fd)
                os.close(fd)
                if isinstance(exc, BlockingIOError) or exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise ResultsError(f"{self.out} is in use: {_describe_holder(holder)} is "
                                       "writing it; wait for it to finish or stop it (its "
                                       f"lock, {self.path.name}, goes when it exits)") from None
                _warn(f"cannot lock {self.path} ({exc.strerror}): running unlocked; do not "
                      f"start a second run on {self.out}")
                return self
            # a holder releasing the lock removes the file: retry if it is not ours any more
            try:
                mine = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                mine = False
            if mine:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)   # drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_lock(fd) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    return (f"{info.get('command', 'another process')} (pid {info['pid']} on "
            f"{info.get('host', '?')}, since {info.get('started', '?')})")


def consolidate(out, meta: dict, extra_sources=(), *, overwrite: bool = False) -> dict:
    """Brings ``out`` up to date before a run: checks it (refusing a different run or a
    corrupt file), folds in the rows of leftover part files ``<out>.rank*`` visible here
    and of ``extra_sources`` ((where, rows, lines) gathered from other ranks), writes
    ``out`` (header only if new) and removes the leftover parts it merged.
    Returns {index: Row} of every certified index. ``overwrite`` discards everything."""
    out = Path(out)
    parts = leftover_parts(out)
    if overwrite:
        for p in parts + [out]:
            if p.exists():
                p.unlink()
        write_atomic(out, meta, [])
        return {}
    existing = read_for_resume(out, meta)
    found = [existing] + [read_for_resume(p, meta) for p in parts]
    sources = [rf.source() for rf in found if rf is not None] + list(extra_sources)
    # a file of a smaller selection (read_results) gets this run's header
    if existing is not None and existing.meta.get("selection") != meta.get("selection"):
        old = existing.meta.get("selection")
        since = "" if old is None else f" from {describe_selection(old)}"
        print(f"dssn: note: {out}: the selection of images grows{since} to "
              f"{describe_selection(meta.get('selection'))}", file=sys.stderr, flush=True)
    if existing is None or len(sources) > 1 or existing.meta != meta:
        lines = merge_rows(sources)
        if existing is None or len(lines) != len(existing.lines) or existing.meta != meta:
            write_atomic(out, meta, lines)
    for p in parts:
        if p.exists():
            p.unlink()
    final = read_results(out, expect_meta=meta)
    return final.by_index()
