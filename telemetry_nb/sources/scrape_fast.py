"""Vectorized parsing of many targets' scrapes at once: numpy over the bytes, Arrow's C++ hashing for the strings.

The exact parser (`scrape.ExpositionParser.rows`) does Python work per line, which was most of a
scrape cycle's CPU. A dcgm-exporter's text is regular, so here the bodies of a group of targets are
joined, the line boundaries and each line's first `{` and last `}` come from numpy, the names,
label sets and values are zero-copy Arrow string slices of the joined bytes (`dictionary_encode`
hashes them in C++, `cast` reads the numbers), and Python runs once per distinct name and per
distinct (target, label set): both repeat every scrape, and label sets are looked up in, and
added to, the exact parser's own cache. Anything irregular in a target's text (a line without
labels, odd spacing, a timestamp, NaN/Inf, a blank sentinel, an unparsable value, a duplicate
series, a name that is not a DCGM field, labels that do not parse, CR, leading whitespace,
non-ASCII) sends that whole target to the exact parser, so what comes out is always exactly what
the exact parser makes of the text; `tests/test_scrape_fast.py` checks that on generated texts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import sliding_window_view

from telemetry_nb.sources.scrape import _BLANKS, _CACHE_LIMIT, ExpositionParser, _valid_name, parse_labels, series_info

_VALUE_CHARS = np.zeros(256, dtype=bool)
_VALUE_CHARS[np.frombuffer(b"0123456789.eE+-", np.uint8)] = True  # Arrow's cast and float() agree on these (test)
_BLANK_VALUES = np.array(sorted(_BLANKS))
_NL, _HASH, _SPACE, _TAB, _OPEN, _CLOSE = 10, 35, 32, 9, 123, 125
_MAX_JOINED = 2**31 - 1  # Arrow string offsets are int32
_HEAD, _TAIL = 128, 32  # where each line's first { and last } are looked for: its first and last bytes
_PAD = b"\0" * _HEAD  # before and after the joined bodies, so that every window is inside


class Parsed(NamedTuple):
    """The samples of the targets that took the fast path, as arrays in text order, target after target.

    Row i is metric `names[midx[i]]` of series `series[sidx[i]]` (the series factory's object) with
    value `values[i]`; target k's rows are `spans[k]` (a slice), or None: parse it with the exact parser.
    """

    series: list[object]
    sidx: np.ndarray
    names: list[str]
    midx: np.ndarray
    values: np.ndarray
    spans: list[slice | None]


class FastParser:
    """Parses targets' bodies with no Python per sample, or says (a None span) that the exact parser must.

    Shares `exact`'s series cache and name sets, so both paths hand out the same series objects.
    `fast` counts the targets parsed here, `fallbacks` the others by reason.
    """

    def __init__(self, exact: ExpositionParser):
        self.exact = exact
        self.fast = 0
        self.fallbacks: Counter[str] = Counter()

    def parse_many(self, bodies: Sequence[bytes], hosts: Sequence[str]) -> Parsed:
        """Parse each body (`hosts[k]` names target k's host for label sets without one); see `Parsed`."""
        spans: list[slice | None] = [None] * len(bodies)
        joined, taken, sizes, refused = _join(bodies, check_each=False)
        if b"\r" in joined or not joined.isascii():  # one look at all of them; body by body only when needed
            joined, taken, sizes, refused = _join(bodies, check_each=True)
        self.fallbacks.update(refused)
        lines = _Lines(joined, np.array(sizes, dtype=np.int64))
        reasons = lines.check()
        out = self._rows(lines, joined, reasons, [hosts[k] for k in taken])
        for j, k in enumerate(taken):
            if reasons[j] is not None:
                self.fallbacks[reasons[j]] += 1
            else:
                spans[k] = slice(int(out.bounds[j]), int(out.bounds[j + 1]))
                self.fast += 1
        return Parsed(out.series, out.sidx, out.names, out.midx, out.values, spans)

    def _rows(self, lines: _Lines, joined: bytes, reasons: list[str | None], hosts: list[str]) -> _Rows:
        """Names, label sets and values of the lines of the bodies still regular; marks the others in `reasons`."""
        lines.keep(reasons)
        n = len(lines.starts)
        offsets = np.empty(6 * n + 2, dtype=np.int32)  # six slices per line: name, {, labels, "} ", value, gap
        offsets[0], offsets[-1] = 0, len(joined)
        offsets[1:-1:6], offsets[2:-1:6], offsets[3:-1:6] = lines.starts, lines.brace, lines.brace + 1
        offsets[4:-1:6], offsets[5:-1:6], offsets[6:-1:6] = lines.close, lines.close + 2, lines.ends
        text = pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(joined))
        pick = np.arange(1, len(offsets) - 1, 6, dtype=np.int64)
        values = _values(pc.take(text, pick + 4), lines, reasons)
        names = pc.dictionary_encode(pc.take(text, pick))
        midx = names.indices.to_numpy()
        name_list = names.dictionary.to_pylist()
        bad_names = np.array([not self._dcgm(name) for name in name_list], dtype=bool)
        if bad_names.any():
            lines.mark(bad_names[midx], reasons, "a name that is not a DCGM field")
        labels = pc.dictionary_encode(pc.take(text, pick + 2))
        good = ~lines.bad_body(reasons)[lines.body]
        lidx = labels.indices.to_numpy()
        if not good.all():
            lines.take(good)
            values, midx, lidx = values[good], midx[good], lidx[good]
        series, sidx, uidx = self._series(lines, lidx, labels.dictionary, hosts, reasons)
        # a duplicate (name, GPU) in one target: the exact parser keeps the first and rejects the others
        per_body = (len(name_list) + 1) * (int(uidx.max(initial=0)) + 1)
        key = lines.body * per_body + midx * (int(uidx.max(initial=0)) + 1) + uidx[sidx]
        key.sort()
        for b in np.unique(key[1:][key[1:] == key[:-1]] // per_body).tolist():
            reasons[b] = reasons[b] or "duplicate series"
        good = ~lines.bad_body(reasons)[lines.body]
        if not good.all():
            lines.take(good)
            values, midx, sidx = values[good], midx[good], sidx[good]
        bounds = np.searchsorted(lines.body, np.arange(len(reasons) + 1))
        return _Rows(series, sidx, name_list, midx, values, bounds)

    def _dcgm(self, name: str) -> bool:
        """Whether the exact parser keeps samples of `name` (a valid name of a DCGM field)."""
        dcgm, others = self.exact._names, self.exact._others
        if name in dcgm:
            return True
        return name not in others and name.startswith("DCGM_") and _valid_name(name, dcgm, others)

    def _series(self, lines: _Lines, lidx: np.ndarray, texts: pa.StringArray, hosts: list[str],
                reasons: list[str | None]) -> tuple[list[object], np.ndarray, np.ndarray]:
        """Per distinct (target, label text), in order of appearance: its series object (the exact parser's cache)."""
        exact = self.exact
        if exact._size > _CACHE_LIMIT:
            exact._series.clear()
            exact._size = 0
        width = len(texts)
        pairs, first, inverse = np.unique(lines.body * width + lidx, return_index=True, return_inverse=True)
        label_texts = texts.to_pylist()
        factory = exact.series_factory
        objects: list[object] = [None] * len(pairs)
        uuids: dict[str, int] = {}
        uidx = np.zeros(len(pairs), dtype=np.int64)
        for p in np.argsort(first, kind="stable").tolist():
            body, text = divmod(int(pairs[p]), width)
            cache = exact._series.get(hosts[body])
            if cache is None:
                cache = exact._series[hosts[body]] = {}
            label_text = label_texts[text]
            cached = cache.get(label_text)
            if cached is None:
                try:
                    info = series_info(parse_labels(label_text), hosts[body])
                    cached = (info, factory(info) if factory is not None else None)
                except ValueError as err:
                    cached = str(err)
                cache[label_text] = cached
                exact._size += 1
            if type(cached) is str:  # the exact parser rejects these lines
                reasons[body] = reasons[body] or "a label set that does not parse"
                continue
            objects[p] = cached[1]
            uidx[p] = uuids.setdefault(cached[0].uuid, len(uuids))
        return objects, inverse.reshape(-1), uidx


class _Rows(NamedTuple):
    series: list[object]
    sidx: np.ndarray
    names: list[str]
    midx: np.ndarray
    values: np.ndarray
    bounds: np.ndarray  # body j's rows are bounds[j]:bounds[j + 1]


class _Lines:
    """The sample lines of joined bodies (not blank, not comments): start, end, first `{`, last `}`, body."""

    def __init__(self, joined: bytes, sizes: np.ndarray):
        a = self.a = np.frombuffer(joined, dtype=np.uint8)
        nl = np.flatnonzero(a == _NL)
        starts = np.empty(len(nl), dtype=np.int64)
        if len(nl):
            starts[0], starts[1:] = len(_PAD), nl[:-1] + 1
        first = a[starts]
        sample = (nl > starts) & (first != _HASH)
        self.starts, self.ends, self.first = starts[sample], nl[sample], first[sample]
        self.body = np.searchsorted(len(_PAD) + np.cumsum(sizes), self.starts, side="right")
        self.bodies = len(sizes)
        self.brace = self.close = self.starts

    def bad_body(self, reasons: list[str | None]) -> np.ndarray:
        return np.fromiter((r is not None for r in reasons), dtype=bool, count=len(reasons))

    def mark(self, bad: np.ndarray, reasons: list[str | None], why: str) -> None:
        """Bodies with a line where `bad` holds get `why`, unless they already have a reason."""
        if not bad.any():
            return
        for b in np.unique(self.body[bad]).tolist():
            reasons[b] = reasons[b] or why

    def take(self, sel: np.ndarray) -> None:
        self.starts, self.ends, self.first = self.starts[sel], self.ends[sel], self.first[sel]
        self.brace, self.close, self.body = self.brace[sel], self.close[sel], self.body[sel]

    def check(self) -> list[str | None]:
        """Per body, why the fast path cannot take it (None: it can, so far): the line layout."""
        reasons: list[str | None] = [None] * self.bodies
        if not len(self.starts):
            return reasons
        self.mark((self.first == _SPACE) | (self.first == _TAB), reasons, "leading whitespace")
        a, starts, ends = self.a, self.starts, self.ends
        head = sliding_window_view(a, _HEAD)[starts] == _OPEN  # a name is short: { is near the start
        brace = starts + head.argmax(axis=1)
        tail = sliding_window_view(a, _TAIL)[ends - _TAIL][:, ::-1] == _CLOSE  # and } near the end
        close = ends - 1 - tail.argmax(axis=1)
        bad = ~head.any(axis=1) | ~tail.any(axis=1) | (brace >= ends) | (close < brace)
        self.mark(bad, reasons, "a line without labels (or a long name or value)")
        bad |= (close + 2 >= ends) | (a[close + 1] != _SPACE)
        self.mark(bad, reasons, "odd spacing after the labels, or no value")
        self.brace, self.close = brace, close
        return reasons

    def keep(self, reasons: list[str | None]) -> None:
        """Drop the lines of bodies that have a reason."""
        good = ~self.bad_body(reasons)[self.body]
        if not good.all():
            self.take(good)


def _values(texts: pa.StringArray, lines: _Lines, reasons: list[str | None]) -> np.ndarray:
    """The values as float64; bodies with one the exact parser would reject or look at closer are marked."""
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32)[texts.offset:texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    odd = np.flatnonzero(~_VALUE_CHARS[data])
    if len(odd):
        bad = np.zeros(len(texts), dtype=bool)
        bad[np.searchsorted(offsets, odd + offsets[0], side="right") - 1] = True
        lines.mark(bad, reasons, "a value other than a plain number (NaN, Inf, timestamp, spacing)")
    try:
        values = pc.cast(texts, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        values = _cast_each(texts, lines, reasons)
    out = ~((values > -1e300) & (values < 2147483632.0))  # what the exact parser looks at closer
    if out.any():
        bad = np.zeros(len(values), dtype=bool)
        bad[out] = ~np.isfinite(values[out]) | np.isin(values[out], _BLANK_VALUES)
        lines.mark(bad, reasons, "a non-finite or DCGM blank value")
    return values


def _cast_each(texts: pa.StringArray, lines: _Lines, reasons: list[str | None]) -> np.ndarray:
    """Values cast body by body, when some body has one Arrow cannot read (those bodies are marked)."""
    values = np.zeros(len(texts))
    bounds = np.searchsorted(lines.body, np.arange(lines.bodies + 1))
    for b in range(lines.bodies):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        if lo == hi or reasons[b] is not None:
            continue
        try:
            values[lo:hi] = pc.cast(texts.slice(lo, hi - lo), pa.float64()).to_numpy()
        except pa.ArrowInvalid:
            reasons[b] = "an unparsable value"
    return values


def _join(bodies: Sequence[bytes], check_each: bool) -> tuple[bytes, list[int], list[int], list[str]]:
    """The bodies joined (each ending with a newline, padded around): text, which bodies, their sizes, and why
    the others were left out."""
    parts: list[bytes] = [_PAD]
    sizes: list[int] = []
    taken: list[int] = []
    refused: list[str] = []
    size = 2 * len(_PAD)
    for k, body in enumerate(bodies):
        reason = _unfit(body) if check_each else None
        if reason is None and size + len(body) + 1 > _MAX_JOINED:
            reason = "too much text in one go"
        if reason is not None:
            refused.append(reason)
            continue
        taken.append(k)
        parts.append(body)
        if body and not body.endswith(b"\n"):
            parts.append(b"\n")
        sizes.append(len(body) + (bool(body) and not body.endswith(b"\n")))
        size += sizes[-1]
    parts.append(_PAD)
    return b"".join(parts), taken, sizes, refused


def _unfit(body: bytes) -> str | None:
    """Why a whole body cannot take the fast path, from checks the bytes type makes at C speed."""
    if b"\r" in body:
        return "CR line ends"
    if not body.isascii():
        return "non-ASCII text"
    return None
