"""How far can ANY fit of magika's kept weights go? An end-to-end distillation bound.

Experiment, not product code. magika 1.0.3 has two eligible layers (the Conv and the logits
MatMul). After pruning both with ``--method asym`` this script fine-tunes every KEPT weight
and both biases of the two layers jointly, end to end, against the dense model's softmax
(KL divergence, Adam, minibatches of the calibration files), with the 2:4 masks fixed. That
is strictly more than any layer-wise one-shot method (or ``--refit-head``) can do with the
same masks and calibration data, so its top-1 agreement on the evaluation files bounds what
such methods can reach.

It runs in two steps, because it needs JAX (onnx-sparse does not depend on it) and because
magika's data is drawn from the files of the running Python installation
(:mod:`tools.realdata`): installing JAX into the project's environment would change the
calibration and evaluation files. So the data and the pruned model are saved from the
project's environment, and the training runs in another one::

    python tools/magika_kd_bound.py --save .cache/kd                 # project venv
    python -m venv /tmp/jax && /tmp/jax/bin/pip install "jax[cpu]" onnx numpy
    /tmp/jax/bin/python tools/magika_kd_bound.py --load .cache/kd --epochs 4 --lr 1e-4

The forward pass is magika's ``standard_v3_3`` graph written out in JAX from the ONNX
initializers (embedding, GELU, position LayerNorm, Conv k=5, GELU, global max, LayerNorm,
dense, softmax); it is checked against onnxruntime before training (the pruned model's
agreement must match).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

P = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/"
NAMES = {
    "E": "jax2tf_get_logits_/Const:0",
    "Eb": P + "Dense_0/Reshape:0",
    "g0": P + "LayerNorm_0/Reshape_2:0",
    "b0": P + "LayerNorm_0/Reshape_3:0",
    "Wc": P + "Conv_0/transpose_3:0",
    "bc": "const_fold_opt__209",
    "g1": P + "LayerNorm_1/Reshape_2:0",
    "b1": P + "LayerNorm_1/Reshape_3:0",
    "Wd": "jax2tf_get_logits_/Const_24:0",
    "bd": P + "Dense_1/Reshape:0",
}
TRAINED = ("Wc", "bc", "Wd", "bd")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", metavar="DIR", help="step 1: save data, dense and asym-pruned model (project venv)")
    ap.add_argument("--load", metavar="DIR", help="step 2: train from a --save directory (needs JAX)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if bool(args.save) == bool(args.load):
        ap.error("give --save DIR (step 1) or --load DIR (step 2)")
    if args.save:
        return _save(Path(args.save))
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print('step 2 needs JAX: pip install "jax[cpu]" (in another environment, see the docstring)', file=sys.stderr)
        return 2
    src = Path(args.load)
    dense = onnx.load(src / "dense.onnx")
    pruned = onnx.load(src / "asym.onnx")
    saved = np.load(src / "data.npz")
    cal = saved["calibration"]
    cat = {"256": saved["evaluation_256"], "all": saved["evaluation_all"]}
    ref = float(saved["asym_agreement_256"])

    def params(model: onnx.ModelProto) -> dict:
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return {k: jnp.asarray(init[v]) for k, v in NAMES.items()}

    fixed = params(dense)

    def gelu(x):
        return 0.5 * x * (1 + jnp.tanh(0.7978845834732056 * (x + 0.044714998453855515 * x**3)))

    def trunk(b):  # bytes -> conv input [n, 256, 512]
        h = gelu(fixed["E"][b] + fixed["Eb"].reshape(64)).reshape(-1, 512, 256)
        mu = h.mean(1, keepdims=True)
        var = jnp.maximum((h * h).mean(1, keepdims=True) - mu * mu, 0)
        h = (h - mu) / jnp.sqrt(var + 1e-6) * fixed["g0"].reshape(512, 1) + fixed["b0"].reshape(512, 1)
        return h.transpose(0, 2, 1)

    def head(x, p):
        y = jax.lax.conv_general_dilated(
            x[..., None], p["Wc"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )[..., 0]
        y = gelu(y + p["bc"].reshape(1, 512, 1)).max(2)
        mu = y.mean(1, keepdims=True)
        var = jnp.maximum((y * y).mean(1, keepdims=True) - mu * mu, 0)
        y = (y - mu) / jnp.sqrt(var + 1e-6) * fixed["g1"].reshape(512) + fixed["b1"].reshape(512)
        return y @ p["Wd"] + p["bd"].reshape(214)

    trunk_j, head_j = jax.jit(trunk), jax.jit(head)

    def logits(b, p, bs=128):
        return np.concatenate([np.asarray(head_j(trunk_j(b[i : i + bs]), p)) for i in range(0, len(b), bs)])

    pd = params(dense)
    top = {k: logits(v, pd).argmax(1) for k, v in cat.items()}
    target = np.asarray(jax.nn.softmax(logits(cal, pd)))

    def score(p, tag):
        got = {k: float(np.mean(logits(v, p).argmax(1) == top[k])) for k, v in cat.items()}
        print(f"{tag}: top-1 agreement {got['256']:.4f} (256 files), {got['all']:.4f} ({len(cat['all'])} files)",
              flush=True)  # fmt: skip
        return got

    p = {k: v for k, v in params(pruned).items() if k in TRAINED}
    score(p, "asym (JAX forward)")
    print(f"asym (onnxruntime): {ref:.4f} (256 files) -- must match the line above", flush=True)
    mask = {k: (p[k] != 0).astype(jnp.float32) for k in ("Wc", "Wd")}

    def loss(q, x, pt):
        return -jnp.mean(jnp.sum(pt * jax.nn.log_softmax(head(x, q)), 1))

    vg = jax.jit(jax.value_and_grad(loss))
    m = {k: jnp.zeros_like(v) for k, v in p.items()}
    v2 = {k: jnp.zeros_like(v) for k, v in p.items()}
    rng = np.random.default_rng(0)
    step = 0
    for ep in range(args.epochs):
        t = time.perf_counter()
        order = rng.permutation(len(cal))
        for i in range(0, len(cal) - args.batch + 1, args.batch):
            idx = order[i : i + args.batch]
            step += 1
            _, grad = vg(p, trunk_j(cal[idx]), target[idx])
            for k in p:
                g = grad[k] * mask[k] if k in mask else grad[k]
                m[k] = 0.9 * m[k] + 0.1 * g
                v2[k] = 0.999 * v2[k] + 0.001 * g * g
                p[k] = p[k] - args.lr * (m[k] / (1 - 0.9**step)) / (jnp.sqrt(v2[k] / (1 - 0.999**step)) + 1e-8)
                if k in mask:
                    p[k] = p[k] * mask[k]
        score(p, f"epoch {ep + 1} ({time.perf_counter() - t:.0f}s)")
    return 0


def _save(dst: Path) -> int:
    from onnx_sparse import api
    from tools import realdata
    from tools.realmodels import model_path

    dense = onnx.load(model_path("magika"))
    calib = realdata.calibration("magika")
    evals = {"256": realdata.evaluation("magika"), "all": realdata.evaluation("magika", 2000)}
    t = time.perf_counter()
    pruned = api.prune(dense, method="asym", calibration=calib)
    print(f"asym prune {time.perf_counter() - t:.0f}s", flush=True)
    ref = realdata.metric("magika", realdata.run(dense, evals["256"]), realdata.run(pruned, evals["256"]))["metric"]
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(dense, dst / "dense.onnx")
    onnx.save(pruned, dst / "asym.onnx")
    np.savez(
        dst / "data.npz",
        calibration=np.concatenate([f["bytes"] for f in calib]),
        evaluation_256=np.concatenate([f["bytes"] for f in evals["256"]]),
        evaluation_all=np.concatenate([f["bytes"] for f in evals["all"]]),
        asym_agreement_256=ref,
    )
    print(f"saved to {dst} (asym top-1 agreement {ref:.4f} on 256 files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
