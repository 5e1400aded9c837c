"""Keep third-party chatter off the terminal: Python warnings and Polygraphy's colour notice go to -v.

Libraries under us warn through Python's :mod:`warnings` (numpy's ``RuntimeWarning: invalid
value encountered in divide`` inside Polygraphy's statistics, deprecations) and Polygraphy
prints "'colored' module is not installed" the first time it colours a message. None of it
is about the user's model or options, so the CLI logs warnings at DEBUG (shown with ``-v``)
and turns Polygraphy's colours off. Our own messages go through :mod:`logging`, never
:mod:`warnings`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, TextIO

__all__ = ["quiet_third_party"]

logger = logging.getLogger(__name__)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logger.debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def quiet_third_party() -> None:
    """Route Python warnings to DEBUG log lines and switch Polygraphy's coloured logging off.

    Called once by the CLI after it installs its log handler; library use is left alone.
    """
    warnings.showwarning = _log_warning
    warnings.simplefilter("default")  # each distinct warning once, then into the log at DEBUG
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:  # pragma: no cover - Polygraphy is a dependency
        return
    colors: Any = G_LOGGER
    colors.colors = False
