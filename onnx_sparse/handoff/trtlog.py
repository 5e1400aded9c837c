"""Read what TensorRT's builder says about 2:4 sparsity, and map its layers back to ONNX nodes.

With ``SPARSE_WEIGHTS`` set, the builder logs two lines (INFO; Polygraphy shows TensorRT INFO at
its own VERBOSE level)::

    [08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620
    [08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_619 + Relu_620

TensorRT 10 (with Myelin) and 11 log instead, once per tactic-selection pass or Myelin region,
so a build may print several pairs; the list after the colon may be absent::

    [TRT] (Sparsity) Found 39 layer(s) eligible to use sparse tactics
    [TRT] (Sparsity) Chose 0 layer(s) using sparse tactics
    (Sparsity) Found N layer(s) eligible to use sparse tactics: <names>
    (Sparsity) Chose M layer(s) using sparse tactics: <names>

Both formats are read. Names from every pair are merged (in order, without repeats); counts are
kept per pair. Where a pair gives a non-zero count without names, the per-layer lists are
incomplete and per-node answers are unknown (:attr:`SparsityLog.eligible_known`); a pair with
count 0 is a complete "none".

The prefix varies (trtexec, ``[TensorRT] INFO:`` from TensorRT 8's Python logger, Polygraphy's
``[V]``, a logging framework's own), so the markers are found anywhere in a line. A list may be
empty, and may run over several lines: a terminal or issue tracker wraps it at a fixed width,
mid-name (NVIDIA/TensorRT#2169 quotes ``..., MatMul_125, Mat`` / ``Mul_139, ...``), so a line
without a log prefix continues the list it follows, joined as it is. A list cut into separate
log records continues on the next record only when the previous piece ends with a comma. If the
markers occur more than once (one log covering several builds), the lists are merged in order.

Items are TensorRT layer names, separated by commas *outside* brackets: fused layers carry commas
of their own (``PWN(PWN(Softplus_144, PWN(Tanh_145)), Mul_146)``). A layer name is made of ONNX
names (a node name, or for layers TensorRT creates itself a tensor name):

* ``A + B`` vertical fusion, ``A || B`` horizontal fusion (NVIDIA/TensorRT#2525);
* ``PWN(A, B)`` a fused point-wise node; ``{ForeignNode[A...B]}`` a Myelin region from node A
  to node B (the nodes in between are not named);
* ``X copy`` a copy of tensor X; ``(Unnamed Layer* 12) [Shuffle]`` and ``Reformatting CopyNode
  for ...`` name no ONNX node;
* ``node_of_T`` an ONNX node without a name, whose first output is T (the ONNX parser's
  ``getNodeName``); ``/model/conv/Conv_output_0`` a tensor the exporter named after its node.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ELIGIBLE_MARKER",
    "PICKED_MARKER",
    "FOUND_MARKER",
    "CHOSE_MARKER",
    "SparsityLog",
    "parse_trt_log",
    "split_layer_list",
    "layer_onnx_names",
    "layer_nodes",
    "map_layers_to_nodes",
]

ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"

FOUND_MARKER = "(Sparsity) Found {n} layer(s) eligible to use sparse tactics"
CHOSE_MARKER = "(Sparsity) Chose {n} layer(s) using sparse tactics"

_MARKERS = (
    ("eligible", re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math\s*:")),
    ("picked", re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers\s*:")),
    # TensorRT 10/11: a count, then an optional ": names"
    ("eligible", re.compile(r"\(Sparsity\)\s*Found\s+(?P<n>\d+)\s+layer\(s\)\s+eligible to use sparse tactics\s*:?")),
    ("picked", re.compile(r"\(Sparsity\)\s*Chose\s+(?P<n>\d+)\s+layer\(s\)\s+using sparse tactics\s*:?")),
)

# The start of a new log record: "[...]" tokens (timestamps, letters, [TRT]), trtexec's "&&&&",
# Python-logging style "INFO:" / "VERBOSE:".
_RECORD_START = re.compile(r"^\s*(\[|&&&&|(?:INFO|VERBOSE|WARNING|ERROR|INTERNAL_ERROR|DEBUG)\s*:)")
_RECORD_PREFIX = re.compile(
    r"^\s*(?:\[[^\]]*\]\s*)*(?:(?:INFO|VERBOSE|WARNING|ERROR|INTERNAL_ERROR|DEBUG|kINFO|kVERBOSE)\s*:\s*)?"
)
_OPEN = "([{"
_CLOSE = ")]}"


@dataclass(frozen=True)
class SparsityLog:
    """The sparsity lines of one builder log.

    Attributes:
        eligible: TensorRT layer names "eligible for sparse math", in log order.
        picked: layer names for which the plan "picked sparse implementation".
        eligible_seen / picked_seen: whether the log had that line at all (an empty list after
            the marker is a real "none"; no marker means the log cannot tell).
        eligible_counts / picked_counts: the N of each TensorRT 10/11 "Found N" / "Chose N" line.
        eligible_unnamed / picked_unnamed: some such line had a non-zero count and no names.
    """

    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    eligible_seen: bool = False
    picked_seen: bool = False
    eligible_counts: list[int] = field(default_factory=list)
    picked_counts: list[int] = field(default_factory=list)
    eligible_unnamed: bool = False
    picked_unnamed: bool = False

    @property
    def eligible_known(self) -> bool:
        """Whether the eligible list is complete (seen, and no count came without its names)."""
        return self.eligible_seen and not self.eligible_unnamed

    @property
    def picked_known(self) -> bool:
        """Whether the picked list is complete."""
        return self.picked_seen and not self.picked_unnamed

    @property
    def eligible_count(self) -> int:
        """Eligible layers: the counts summed over the reports (TensorRT 10/11), else the names."""
        return sum(self.eligible_counts) if self.eligible_counts else len(self.eligible)

    @property
    def picked_count(self) -> int:
        """Layers run with sparse tactics: the counts summed over the reports, else the names."""
        return sum(self.picked_counts) if self.picked_counts else len(self.picked)

    @property
    def found(self) -> bool:
        """Whether the log had either sparsity line."""
        return self.eligible_seen or self.picked_seen

    @property
    def not_picked(self) -> list[str]:
        """Eligible layers TensorRT ran with dense kernels (usually because dense was faster)."""
        picked = set(self.picked)
        return [name for name in self.eligible if name not in picked]


def _depth_split(text: str, seps: Sequence[str]) -> list[str] | None:
    """Split ``text`` at any of ``seps`` outside brackets; None if the brackets do not balance."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:
            sep = next((s for s in seps if text.startswith(s, i)), None)
            if sep is not None:
                parts.append(text[start:i])
                i += len(sep)
                start = i
                continue
        i += 1
    if depth:
        return None
    parts.append(text[start:])
    return parts


def _clean(name: str) -> str:
    return " ".join(name.split())


def split_layer_list(text: str) -> list[str]:
    """Split a logged layer list at the commas that separate layers (not those inside ``PWN(...)``).

    Whitespace runs inside a name are collapsed to one space; empty items are dropped. If the
    brackets do not balance (a name with a stray bracket), every comma separates.
    """
    parts = _depth_split(text, (",",))
    if parts is None:
        parts = text.split(",")
    return [name for name in (_clean(p) for p in parts) if name]


def _join_continuation(buf: str, line: str) -> str:
    if line[:1].isspace():
        return buf.rstrip() + " " + line.strip()
    return buf + line.rstrip()


def parse_trt_log(text: str | Iterable[str]) -> SparsityLog:
    """Find the two sparsity lines in a TensorRT builder log (any prefix, wrapped or not).

    Args:
        text: the whole log, or an iterable of its lines.

    Returns:
        The eligible and picked layer names (duplicates dropped, first occurrence kept).
    """
    lines = text.splitlines() if isinstance(text, str) else [str(x).rstrip("\r\n") for x in text]
    lists: dict[str, list[str]] = {"eligible": [], "picked": []}
    seen = {"eligible": False, "picked": False}
    counts: dict[str, list[int]] = {"eligible": [], "picked": []}
    unnamed = {"eligible": False, "picked": False}
    kind: str | None = None
    count: int | None = None
    buf = ""

    def flush() -> None:
        nonlocal kind, buf, count
        if kind is not None:
            names = split_layer_list(buf)
            for name in names:
                if name not in lists[kind]:
                    lists[kind].append(name)
            if count is not None:
                counts[kind].append(count)
                unnamed[kind] |= count > 0 and not names
        kind, buf, count = None, "", None

    for raw in lines:
        line = raw.rstrip("\r\n")
        hit = None
        for k, pattern in _MARKERS:
            m = pattern.search(line)
            if m:
                hit = (k, m)
                break
        if hit is not None:
            flush()
            kind, m = hit
            seen[kind] = True
            count = int(m.group("n")) if "n" in m.groupdict() else None
            buf = line[m.end() :]
            continue
        if kind is None:
            continue
        if not line.strip() or line.lstrip().startswith("```"):
            flush()
        elif _RECORD_START.match(line):
            if buf.rstrip().endswith(","):  # a list cut into separate log records
                buf = buf.rstrip() + " " + line[_RECORD_PREFIX.match(line).end() :].strip()
            else:
                flush()
        else:  # wrapped text, or a multi-line message's continuation
            buf = _join_continuation(buf, line)
    flush()
    return SparsityLog(
        eligible=lists["eligible"],
        picked=lists["picked"],
        eligible_seen=seen["eligible"],
        picked_seen=seen["picked"],
        eligible_counts=counts["eligible"],
        picked_counts=counts["picked"],
        eligible_unnamed=unnamed["eligible"],
        picked_unnamed=unnamed["picked"],
    )


# --------------------------------------------------------------------------- layer -> ONNX names

_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$", re.S)
_UNNAMED = re.compile(r"^\(Unnamed Layer\*?\s*\d+\)(\s*\[[^\]]*\])*$")
_OUTPUT_SUFFIX = re.compile(r"^(.*)_output_\d+$")


def _onnx_parts(text: str, names: list[str], ranges: list[tuple[list[str], list[str]]]) -> None:
    s = _clean(text)
    if not s or s.startswith("Reformatting CopyNode"):  # a reformat layer names the layer it feeds
        return
    parts = _depth_split(s, (" + ", " || "))
    if parts is not None and len(parts) > 1:
        for part in parts:
            _onnx_parts(part, names, ranges)
        return
    m = _FOREIGN.match(s)
    if m:
        first, dots, last = m.group(1).partition("...")
        if dots:
            a: list[str] = []
            b: list[str] = []
            _onnx_parts(first, a, ranges)
            _onnx_parts(last, b, ranges)
            ranges.append((a, b))
        else:
            _onnx_parts(first, names, ranges)
        return
    if s.startswith("PWN(") and s.endswith(")"):
        inner = _depth_split(s[4:-1], (",",))
        if inner is not None:
            for part in inner:
                _onnx_parts(part, names, ranges)
            return
    if _UNNAMED.match(s):
        return
    if s.endswith(" copy"):
        s = s[: -len(" copy")]
    names.append(s)


def layer_onnx_names(layer: str) -> tuple[list[str], list[tuple[list[str], list[str]]]]:
    """The ONNX names inside one TensorRT layer name.

    Returns:
        ``(names, ranges)``: the node or tensor names the layer is built from, and for each
        ``{ForeignNode[A...B]}`` the names found in ``A`` and in ``B`` (the region's ends).
    """
    names: list[str] = []
    ranges: list[tuple[list[str], list[str]]] = []
    _onnx_parts(layer, names, ranges)
    return names, ranges


def _resolve(name: str, nodes: set[str], outputs: Mapping[str, str]) -> str | None:
    if name in nodes:
        return name
    if name.startswith("node_of_"):
        tensor = name[len("node_of_") :]
        if tensor in outputs:
            return outputs[tensor]
        if tensor in nodes:
            return tensor
    if name in outputs:
        return outputs[name]
    m = _OUTPUT_SUFFIX.match(name)
    if m and m.group(1) in nodes:
        return m.group(1)
    return None


def layer_nodes(
    layer: str,
    node_names: Sequence[str],
    outputs: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """The ONNX nodes one TensorRT layer was built from.

    Args:
        layer: a TensorRT layer name.
        node_names: the model's node names, in graph order (ranges are expanded in this order).
        outputs: optional tensor name -> producing node name (resolves ``node_of_T``, copies and
            tensor-named layers exactly).

    Returns:
        ``(named, in_range)``, both in graph order: the nodes the layer names (fused parts, a
        Myelin region's two ends), and the nodes strictly inside a ``{ForeignNode[A...B]}``
        region, which TensorRT does not name (it may or may not compute them as one would think).
    """
    outputs = outputs or {}
    nodes = set(node_names)
    index = {n: i for i, n in enumerate(node_names)}
    names, ranges = layer_onnx_names(layer)
    named: list[str] = []

    def add(node: str | None) -> None:
        if node is not None and node not in named:
            named.append(node)

    for name in names:
        add(_resolve(name, nodes, outputs))
    spans = []
    for first, last in ranges:
        ends_a = [n for n in (_resolve(x, nodes, outputs) for x in first) if n is not None]
        ends_b = [n for n in (_resolve(x, nodes, outputs) for x in last) if n is not None]
        for n in ends_a + ends_b:
            add(n)
        if ends_a and ends_b:
            spans.append(sorted((index[ends_a[0]], index[ends_b[-1]])))
    in_range = [n for lo, hi in spans for n in node_names[lo + 1 : hi] if n not in named]
    in_range = list(dict.fromkeys(in_range))
    return sorted(named, key=lambda n: index.get(n, len(index))), in_range


def _rejoin_commas(layers: Sequence[str], nodes: set[str], max_parts: int = 8) -> list[str]:
    """Undo list splits inside ONNX node names that contain ", " themselves."""
    comma_nodes = {n for n in nodes if "," in n}
    if not comma_nodes:
        return list(layers)
    out: list[str] = []
    i = 0
    while i < len(layers):
        best = i
        for j in range(i + 1, min(len(layers), i + max_parts)):
            if any(name in comma_nodes for name in layer_onnx_names(", ".join(layers[i : j + 1]))[0]):
                best = j
                break
        out.append(", ".join(layers[i : best + 1]))
        i = best + 1
    return out


def map_layers_to_nodes(
    layer_names: Sequence[str],
    node_names: Sequence[str],
    outputs: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Map TensorRT layer names back to the ONNX nodes they were built from.

    Args:
        layer_names: TensorRT layer names (e.g. :attr:`SparsityLog.eligible`).
        node_names: every ONNX node name of the model that was built, in graph order.
        outputs: optional tensor name -> producing node name (for ``node_of_T`` and tensor names).

    Returns:
        ONNX node name -> the layer names that contain it, for every node some layer names
        (nodes in graph order). Layers that name no known node appear in no list. Nodes inside
        a ``{ForeignNode[A...B]}`` region are all mapped to it.
    """
    nodes = set(node_names)
    index = {n: i for i, n in enumerate(node_names)}
    result: dict[str, list[str]] = {}
    for layer in _rejoin_commas(list(layer_names), nodes):
        named, in_range = layer_nodes(layer, node_names, outputs)
        for node in named + in_range:
            result.setdefault(node, [])
            if layer not in result[node]:
                result[node].append(layer)
    return dict(sorted(result.items(), key=lambda kv: index.get(kv[0], len(index))))
