"""``onnx-sparse prune MODEL -o OUT``: prune every eligible layer to 2:4, atomically and verified.

Calibrated pruning (``--method wanda|sparsegpt|asym``, ``--bias-correction``, ``--sensitivity``,
``--target-cosine``) takes its data the Polygraphy way: ``--load-inputs`` (Polygraphy JSON),
``--data-loader-script SCRIPT[:FUNC]``, or, last resort, seeded random data (``--seed``,
``--iterations``, ``--input-shapes``) with a loud warning.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from onnx_sparse.api import prune_file
from onnx_sparse.cli.base import Tool
from onnx_sparse.cli.common import (
    add_data_args,
    add_model_arg,
    add_selection_args,
    add_table_args,
    load_feeds,
    preflight,
    script_path,
    table_width,
)
from onnx_sparse.cli.quantize import add_quantize_args, report_layers
from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.prune import totals
from onnx_sparse.recipe import DEFAULT_MAX_ROWS, METHODS, Recipe
from onnx_sparse.report import fmt_count, format_table, write_json

logger = logging.getLogger(__name__)


class PruneTool(Tool):
    name = "prune"
    help = "Prune every eligible Conv/Gemm/MatMul weight to the 2:4 pattern TensorRT needs."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arg(parser)
        parser.add_argument("-o", "--output", metavar="PATH", help="Where to write the pruned model.")
        parser.add_argument("--in-place", action="store_true", help="Overwrite the input model (only with this flag).")
        add_selection_args(parser)
        parser.set_defaults(min_channels=None)  # None: not given (a --recipe file's value stands)
        parser.add_argument(
            "--fc-layout",
            action="store_true",
            default=None,
            help="First store fully-connected weights as [K_out, C_in] (MatMul -> Gemm transB=1), "
            "so groups of 4 run along the contiguous axis.",
        )
        parser.add_argument(
            "--annotate", action="store_true", default=None, help="Write the verdict and result into the nodes."
        )
        parser.add_argument("--report", metavar="PATH", help="Write a JSON report (per layer and totals).")
        parser.add_argument(
            "--no-verify",
            action="store_true",
            help="Skip the onnx.checker and onnxruntime checks of the output (not recommended).",
        )
        _add_calibration_args(parser)
        group = parser.add_argument_group(
            "Recipe",
            "Every pruning setting above (method, selection, calibration settings, target, --fc-layout, "
            "--annotate) forms one recipe, which the output model records in its metadata "
            "(`onnx-sparse inspect` shows it).",
        )
        group.add_argument(
            "--recipe",
            metavar="PATH",
            help="Read the recipe from this JSON file (as written by --save-recipe); options given on the "
            "command line override the file's values.",
        )
        group.add_argument(
            "--save-recipe",
            metavar="PATH",
            help="Write the recipe this run used (defaults resolved) as JSON; --recipe PATH with the same model "
            "and data reproduces the output byte for byte.",
        )
        add_table_args(parser)
        parser.add_argument(
            "--int8",
            action="store_true",
            default=None,
            help="Then quantize the pruned model to INT8 Q/DQ (as `onnx-sparse quantize`) on the same calibration data.",
        )
        add_quantize_args(parser)
        parser.add_argument(
            "--int8-joint",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="With --int8: SparseGPT's walk rounds the INT8 layers' kept weights onto their INT8 grids as it "
            "fixes them, so pruning and rounding error are compensated together (default: off: the FP32 prune's "
            "weights are rounded afterwards, which measured as well or better on the real models).",
        )
        parser.add_argument(
            "--int8-fit-quantized",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="With --int8: fit each layer on its input as the INT8 model will compute it (everything upstream "
            "pruned and INT8-rounded, its own input rounded), so the refits answer quantization error too "
            "(default: off).",
        )

    def run(self, args: argparse.Namespace) -> int:
        data_given = bool(args.load_inputs or args.data_loader_script)
        given = recipe_from_args(args)
        recipe = given.resolve(has_data=data_given)
        needs_data = recipe.needs_data
        measure_only = recipe.sensitivity and recipe.target_cosine is None and args.output is None and not args.in_place
        if args.output is None and not args.in_place and not measure_only:
            raise OnnxSparseError("no output path", hint="pass -o OUT, or --in-place to overwrite the input")
        (mf,) = preflight(
            args, models=[args.model],
            json_reads=[("--load-inputs", p) for p in args.load_inputs] + [("--recipe", p) for p in [args.recipe] if p],
            reads=[("--data-loader-script", script_path(args.data_loader_script))],
            writes=[("--report", args.report), ("--sensitivity-json", args.sensitivity_json),
                    ("--save-recipe", args.save_recipe)],
            model_output=None if measure_only else (args.output or args.model), in_place=args.in_place,
        )  # fmt: skip
        if (
            not needs_data
            and not recipe.int8
            and (data_given or args.input_shapes or args.iterations or args.mask_input)
        ):
            logger.warning("calibration data options are ignored: magnitude pruning needs no data")
        if given.method is None and data_given:
            logger.info(
                "recipe: %s (the default with calibration data; --method picks a single method)", recipe.describe()
            )
        real = {"value": True}
        loaded_once: list[list[dict]] = []  # the feeds, loaded once and shared by pruning and --int8

        def feeds(model: Any) -> list[dict]:
            if loaded_once:
                return loaded_once[0]
            loaded, real["value"] = load_feeds(args, model, recipe.calib_samples)
            loaded_once.append(loaded)
            return loaded

        reports: list[Any] = []
        if measure_only:
            from onnx_sparse.passes.sensitivity import measure_sensitivity

            report = measure_sensitivity(mf, feeds(mf.model), recipe)
            self._sensitivity(report, args)
            if args.save_recipe:
                recipe.save(args.save_recipe)
                logger.info("wrote %s", args.save_recipe)
            _random_reminder(real["value"])
            return 0
        out = Path(args.output) if args.output else Path(args.model)
        if recipe.int8 and not needs_data:  # bad calibration data fails before the pruning, not after it
            feeds(mf.model)
        result = prune_file(
            mf,  # the model the checks loaded: the file is read once
            out,
            recipe,
            in_place=args.in_place,
            verify=not args.no_verify,
            calibration=feeds if needs_data or recipe.int8 else None,
            consume=True,  # not read again: pruned where it was loaded, its weights never held twice
            sensitivity_report=reports.append,
        )
        quantized: list[Any] = []
        if recipe.int8:
            from onnx_sparse.quant import LayerQuant  # with scipy behind it: only when asked for INT8

            quantized = [r for r in result.records if isinstance(r, LayerQuant)]
            report_layers(quantized)
        records = [r for r in result.records if hasattr(r, "retained_magnitude")]
        if records:
            rows = [
                {
                    "nodes": ",".join(r.nodes),
                    "weight": r.weight,
                    "method": r.method,
                    "axis": r.axis,
                    "changed": f"{r.groups_changed}/{r.groups}",
                    "retained": r.retained_magnitude,
                }
                for r in records
            ]
            cols = [("nodes", "node(s)"), ("weight", "weight"), ("method", "method"), ("axis", "axis"),
                    ("changed", "groups changed"), ("retained", "retained |w|")]  # fmt: skip
            logger.info(
                "%s",
                format_table(
                    rows, cols, width=table_width(args), keep=("nodes",), optional=("weight", "axis", "method")
                ),
            )
        else:
            logger.warning("no eligible layers selected: nothing to prune")
        for report in reports:
            self._sensitivity(report, args)
        logger.info("wrote %s%s", out, "" if result.modified else " (no weight changed)")
        if args.report:
            doc = {"model": str(args.model), "output": str(out), "method": recipe.method,
                   "recipe": recipe.to_dict(), "layers": [r.to_json() for r in records],
                   "totals": totals(records)}  # fmt: skip
            if needs_data:
                doc["calibration"] = {"random": not real["value"]}
            if reports:
                doc["sensitivity"] = reports[-1].to_json()
            if recipe.int8:
                doc["int8"] = [layer.to_json() for layer in quantized]
            write_json(args.report, doc)
            logger.info("wrote %s", args.report)
        if args.save_recipe:
            recipe.save(args.save_recipe)
            logger.info("wrote %s", args.save_recipe)
        if needs_data or recipe.int8:
            _random_reminder(real["value"])
        return 0

    @staticmethod
    def _sensitivity(report: Any, args: argparse.Namespace) -> None:
        cols = [("nodes", "node(s)"), ("op", "op"), ("macs", "MACs/params"), ("min_cos", "min cosine"),
                ("mean_cos", "mean cosine"), ("rel_l2", "rel L2")]  # fmt: skip
        rows = report.rows()
        if report.target_cosine is not None:
            cols.append(("chosen", "pruned"))
        for r in rows:
            r["macs"] = fmt_count(r["macs"])
        held = f", fidelity on {report.held_out} held out" if report.held_out else ""
        logger.info(
            "sensitivity (%s, each layer pruned alone, %d calibration feeds%s, outputs %s):\n%s",
            report.method, report.samples, held, ", ".join(report.outputs),
            format_table(rows, cols, width=table_width(args), keep=("nodes",)),
        )  # fmt: skip
        if report.target_cosine is not None and report.measured is not None:
            logger.info(
                "target cosine %.5f: %d of %d layers pruned, coverage %.1f%% of eligible MACs, "
                "measured min output cosine %.5f (mean %.5f, rel L2 %.4g) on %s",
                report.target_cosine, len(report.chosen), sum(len(x.nodes) for x in report.layers),
                100 * (report.coverage or 0.0), report.measured.min_cosine, report.measured.mean_cosine,
                report.measured.mean_rel_l2,
                f"{report.held_out} held-out calibration feeds" if report.held_out else "the calibration data",
            )  # fmt: skip
        if args.sensitivity_json:
            write_json(args.sensitivity_json, report.to_json())
            logger.info("wrote %s", args.sensitivity_json)


#: Recipe fields and the argparse destinations they come from (None / empty: not given).
_RECIPE_FLAGS = {
    "method": "method", "include": "include", "exclude": "exclude", "ops": "ops", "min_channels": "min_channels",
    "bias_correction": "bias_correction", "refit_head": "refit_head", "damp": "damp",
    "refit_confirm": "refit_confirm", "blocksize": "blocksize",
    "max_rows": "max_rows", "seed": "seed", "row_mask": "mask_input", "calib_samples": "calib_samples",
    "sensitivity": "sensitivity", "target_cosine": "target_cosine", "holdout": "holdout",
    "fc_layout": "fc_layout", "annotate": "annotate", "int8": "int8", "int8_calibration": "act_calibration",
    "int8_percentile": "act_percentile", "int8_layers": "int8_layers", "int8_max_error": "int8_max_error",
    "int8_smooth": "int8_smooth", "int8_joint": "int8_joint", "int8_fit_quantized": "int8_fit_quantized",
    "int8_target_cosine": "int8_target_cosine",
}  # fmt: skip


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe of ``--recipe FILE`` (or the defaults), with every option given on the command line on top."""
    base = Recipe.load(args.recipe) if args.recipe else Recipe()
    changes = {}
    for field, dest in _RECIPE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or value == []:
            continue
        changes[field] = value
    if args.sensitivity_json is not None:
        changes["sensitivity"] = True
    if changes.get("int8_target_cosine") is not None and changes["int8_target_cosine"] <= -1:
        changes["int8_target_cosine"] = None  # -1: every layer stays INT8
    return base.replace(**changes)


def _random_reminder(real: bool) -> None:
    if not real:
        from onnx_sparse.calib.data import RANDOM_DATA_WARNING

        logger.warning("%s", RANDOM_DATA_WARNING)


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:

    group = parser.add_argument_group(
        "Calibrated pruning",
        "Fit each layer to calibration data, layer by layer on the already pruned model "
        "(data options follow Polygraphy's).",
    )
    group.add_argument(
        "--method",
        choices=METHODS,
        help="magnitude: largest |w| (no data); wanda: |w| x input norm; sparsegpt: OBS mask and weight update; "
        "asym: refit to the dense model's layer output, then sparsegpt. Default with calibration data: asym + "
        "--bias-correction + --refit-head (what measured best on real models; slower); without data: magnitude.",
    )
    add_data_args(group, seed_help="Seed of the random data and of the row subsampling.")
    group.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Correct each pruned layer's bias (adding one if needed) to keep its mean output "
        "(on by default in the default recipe).",
    )
    group.add_argument(
        "--refit-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="After the layer-wise fits, refit a pruned MatMul/Gemm whose output feeds a softmax the model "
        "returns (a classifier head) to the dense model's probabilities by KL divergence (kept weights and "
        "bias; the step is chosen on held-out calibration samples; on by default in the default recipe).",
    )
    group.add_argument("--damp", type=float, help="SparseGPT relative damping (default 0.01).")
    group.add_argument(
        "--refit-confirm",
        type=int,
        metavar="K",
        help="asym: let the pruned refit's held-out error decide between the K dampings whose dense refit "
        "scored best (default 0: the dense score alone). Dearer (about 30%% on MiniLM-L3) and not better "
        "everywhere: K=2 gained up to 0.02 on some real models and lost 0.009 on PP-OCRv4 det.",
    )
    group.add_argument("--blocksize", type=int, help="SparseGPT lazy-update block size (default 128).")
    group.add_argument(
        "--max-rows",
        type=int,
        metavar="N",
        help=f"Activation rows per sample and layer (seeded subsample; default {DEFAULT_MAX_ROWS}).",
    )
    group.add_argument(
        "--mask-input",
        metavar="NAME",
        help="Graph input whose zeros mark padding, e.g. attention_mask [batch, seq]: activation rows at padded "
        "positions are left out of the calibration statistics (and of the --refit-head fit).",
    )
    group.add_argument(
        "--sensitivity",
        action="store_true",
        default=None,
        help="Prune each layer alone and report how far the outputs move (without -o: report only).",
    )
    group.add_argument("--sensitivity-json", metavar="PATH", help="Write the sensitivity report as JSON.")
    group.add_argument(
        "--target-cosine",
        type=float,
        metavar="X",
        help="Prune the most work (MACs) that keeps every float output's cosine to the dense model >= X "
        "on held-out calibration feeds (see --holdout).",
    )
    group.add_argument(
        "--holdout",
        type=float,
        metavar="SHARE",
        help="With --target-cosine: share of the calibration feeds (every k-th one) kept out of fitting and used "
        "to judge the target; 0 judges on the fitted data, which flatters fitted layers (default: 0.25).",
    )


TOOL = PruneTool()
