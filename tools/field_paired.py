"""Paired sign tests of a fresh ``prune --int8`` against field models saved by an earlier run.

``tools/eval_int8.py --save DIR`` keeps every variant's model; the field tools' cells depend only on
the sparse FP32 model and the calibration feeds, so when only ``prune --int8`` changes, its new model
can be set against the saved field models on the same evaluation samples without running NNCF or
ModelOpt again. The sparse FP32 model is pruned again and must have the saved one's bytes (else the
field cells were made from another model and the comparison says so and stops)::

    python tools/field_paired.py --saved out/field_s30/models --models ppocr_cls magika \\
        [--evaluation-size 1108]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402

from tools import eval_int8, eval_real, realdata  # noqa: E402
from tools.realmodels import model_path  # noqa: E402


def compare(name: str, saved: Path, evaluation_size: int | None) -> list[str]:
    from onnx_sparse import api
    from onnx_sparse.recipe import Recipe

    data = eval_real.load(name, False, evaluation_size=evaluation_size)
    lines = []
    with tempfile.TemporaryDirectory(prefix="field_paired_") as tmp_name:
        tmp = Path(tmp_name)
        src = str(model_path(name))
        api.prune_file(src, tmp / "sparse.onnx", Recipe(), calibration=data.calibration)
        fresh = onnx.load(str(tmp / "sparse.onnx")).SerializeToString()
        if fresh != onnx.load(str(saved / f"{name}.sparse.onnx")).SerializeToString():
            return [f"{name}: the sparse FP32 model is not the saved one's: the field cells are not comparable"]
        api.prune_file(src, tmp / "int8.onnx", Recipe(int8=True), calibration=data.calibration)
        int8 = onnx.load(str(tmp / "int8.onnx"))
        ours, ours_scores = eval_int8._as_written(data, int8)
        ready = eval_int8.readiness(int8, None)["ready"]
        lines.append(f"{name} ({len(ours_scores)} samples): prune --int8 {ours:.4f} ({100 * ready:.2f}% ready)")
        for variant in eval_int8.FIELD:
            path = saved / f"{name}.{variant}.onnx"
            if not path.exists():
                continue
            theirs, scores = eval_int8._as_written(data, onnx.load(str(path)))
            t = eval_int8.sign_test(ours_scores, scores)
            lines.append(
                f"  vs {variant} {theirs:.4f}: better on {t['better']}, worse on {t['worse']}, p = {t['p']:.3g}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved", type=Path, required=True, help="the --save folder of an eval_int8.py run")
    parser.add_argument("--models", nargs="+", default=list(realdata.MODELS), choices=realdata.MODELS)
    parser.add_argument("--evaluation-size", type=int, metavar="N")
    args = parser.parse_args(argv)
    for name in args.models:
        print("\n".join(compare(name, args.saved, args.evaluation_size)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
