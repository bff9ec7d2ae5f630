"""Optional parts of the install: the notebooks extra (`pip install 'telemetry-nb[notebooks]'`).

The core install runs the streamer, collector, API gateway and CLI; notebooks, the Voilà dashboard
and exploration need the extra. Commands that need it say so instead of failing with an ImportError.
"""

from __future__ import annotations

import importlib.util

NOTEBOOKS_EXTRA = "telemetry-nb[notebooks]"
NOTEBOOK_MODULES = ("voila", "ipykernel", "ipywidgets", "pandas", "altair", "vl_convert", "papermill")


def missing_notebook_modules(modules: tuple[str, ...] = NOTEBOOK_MODULES) -> list[str]:
    """The modules of the notebooks extra that are not installed."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def notebooks_extra_message(what: str, missing: list[str]) -> str:
    return (f"{what} needs the notebooks extra ({', '.join(missing)} not installed): "
            f"pip install '{NOTEBOOKS_EXTRA}' (from a checkout: pip install '.[notebooks]')")
