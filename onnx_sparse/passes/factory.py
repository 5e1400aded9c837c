"""From a :class:`~onnx_sparse.recipe.Recipe` to the pruning pass that carries it out.

This sits above :mod:`onnx_sparse.passes.sensitivity` and :mod:`onnx_sparse.passes.calibrated`
(which imports nothing from here or from the sensitivity module): the API, the CLI and the
Polygraphy plugin all get their pass from :func:`make_prune_pass`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onnx_sparse.errors import OnnxSparseError
from onnx_sparse.passes.base import Pass
from onnx_sparse.passes.prune import PrunePass
from onnx_sparse.recipe import Recipe

if TYPE_CHECKING:  # the calibrated passes (and scipy behind them) load only when a recipe needs them
    from onnx_sparse.passes.calibrated import FeedSource

__all__ = ["make_prune_pass"]

logger = logging.getLogger(__name__)


def make_prune_pass(
    recipe: Recipe | str | None = None,
    calibration: FeedSource | None = None,
    *,
    sensitivity_report: Callable[[Any], None] | None = None,
    threads: int | None = None,
    **options: Any,
) -> Pass:
    """The pruning pass for ``recipe`` (resolved first: :meth:`Recipe.resolve`).

    Plain magnitude (no bias correction, head refit, sensitivity or target) is the data-free
    :class:`PrunePass`; ``sensitivity`` or ``target_cosine`` give a
    :class:`~onnx_sparse.passes.sensitivity.SensitivityPrunePass` (``sensitivity_report`` is
    called with its report); anything else a
    :class:`~onnx_sparse.passes.calibrated.CalibratedPrunePass`. ``fc_layout`` and ``annotate``
    are pipeline steps around this pass (:func:`onnx_sparse.api.build_prune_passes`).

    The older form, a method name (or None) with the recipe's fields as keywords, builds the
    recipe from them.
    """
    if isinstance(recipe, Recipe):
        if options:
            raise TypeError(f"pass either a Recipe or keyword options, not both ({sorted(options)})")
    else:
        recipe = Recipe(method=recipe, **options)
    recipe = recipe.resolve(has_data=calibration is not None)
    if recipe.sensitivity or recipe.target_cosine is not None:
        if calibration is None:
            raise OnnxSparseError(
                "sensitivity and target_cosine need calibration data to measure the outputs on",
                hint="pass calibration feeds (a list of {input name: array})",
            )
        from onnx_sparse.passes.sensitivity import SensitivityPrunePass

        return SensitivityPrunePass(recipe, calibration, threads=threads, report=sensitivity_report)
    if not recipe.needs_data:
        if recipe.row_mask is not None:
            logger.warning("--mask-input %r is ignored: magnitude pruning reads no data", recipe.row_mask)
        return PrunePass(**recipe.selection)
    from onnx_sparse.passes.calibrated import CalibratedPrunePass

    return CalibratedPrunePass(recipe, calibration, threads=threads)
