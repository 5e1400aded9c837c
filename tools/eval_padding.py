"""What padding does to calibration, and what ``--mask-input`` gives back (MiniLM-L3, real sentences).

Users often tokenize calibration text with ``padding="max_length"``: every feed is then
mostly [PAD] tokens, whose activations enter every layer's statistics. This prunes MiniLM-L3
at full coverage with the same calibration sentences fed three ways and judges each on the
disjoint evaluation sentences (sentence-embedding cosine against the dense model):

* ``tight``: batches of similar length, padded to the longest (``tools.realdata``'s feeds);
* ``padded``: batches in source order, every one padded to ``--pad-to`` tokens;
* ``padded + mask``: the same, with ``row_mask="attention_mask"`` (``--mask-input``).

Usage::

    python tools/eval_padding.py [--methods sparsegpt asym] [--pad-to 128] [--calibration-size 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import realdata  # noqa: E402
from tools.realmodels import model_path  # noqa: E402

NAME = "minilm_l3"


def padded_feeds(sentences: Sequence[str], batch: int, pad_to: int) -> list[realdata.Feed]:
    """Batches of ``sentences`` in their order, each padded with [PAD] (id 0, mask 0) to ``pad_to`` tokens."""
    feeds = []
    for i in range(0, len(sentences), batch):
        feed = realdata._minilm_feed(sentences[i : i + batch])
        out = {}
        for key, arr in feed.items():
            full = np.zeros((arr.shape[0], max(pad_to, arr.shape[1])), dtype=arr.dtype)
            full[:, : arr.shape[1]] = arr
            out[key] = full
        feeds.append(out)
    return feeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt"], choices=["wanda", "sparsegpt", "asym"])
    parser.add_argument("--pad-to", type=int, default=128)
    parser.add_argument("--calibration-size", type=int, default=200)
    args = parser.parse_args(argv)

    from onnx_sparse import api

    dense = onnx.load(model_path(NAME))
    sentences = [s for _, s in realdata.samples(NAME, realdata.CALIBRATION, args.calibration_size)]
    evals = realdata.evaluation(NAME)
    dense_eval = realdata.run(dense, evals)
    ways = {
        "tight": (realdata.calibration(NAME, args.calibration_size), None),
        "padded": (padded_feeds(sentences, realdata._BATCH[NAME], args.pad_to), None),
        "padded + mask": (padded_feeds(sentences, realdata._BATCH[NAME], args.pad_to), "attention_mask"),
    }
    for way, (feeds, _) in ways.items():
        real = sum(int(f["attention_mask"].sum()) for f in feeds)
        total = sum(f["attention_mask"].size for f in feeds)
        print(f"{way:14s} {len(feeds)} feeds, {real} real tokens of {total} ({100 * (1 - real / total):.0f}% padding)")
    print(f"{'method':10s} {'calibration':14s} {'sentence cos':>12s} {'min':>7s} {'prune s':>8s}")
    for method in args.methods:
        for way, (feeds, mask) in ways.items():
            t0 = time.perf_counter()
            pruned = api.prune(dense, method=method, calibration=feeds, row_mask=mask)
            seconds = time.perf_counter() - t0
            m = realdata.metric(NAME, dense_eval, realdata.run(pruned, evals))
            print(
                f"{method:10s} {way:14s} {m['metric']:12.4f} {m['min_sentence_cosine']:7.4f} {seconds:8.1f}", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
