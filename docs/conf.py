"""Sphinx configuration of the scinfl documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (after installing the ``docs``
dependency group). No network access is needed: intersphinx is not used and notebooks are
rendered as stored (``nb_execution_mode = "off"``).
"""

from __future__ import annotations

from importlib.metadata import version as _version

project = "scinfl"
author = "scinfl developers"
copyright = "scinfl developers"
release = _version("scinfl")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",  # MyST markdown pages and Jupyter notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx_autodoc_typehints",  # must come after napoleon
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- API reference ---------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "mixed"
autoclass_content = "class"

napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = True

typehints_use_rtype = False
typehints_defaults = "comma"
always_document_param_types = False

# -- MyST / notebooks -----------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # notebooks are stored with the outputs of a full run
nb_merge_streams = True

# -- HTML ------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"scinfl {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
}
html_static_path: list[str] = []


# -- API page coverage -------------------------------------------------------------------------
# Every public name (``__all__``) of these packages must appear on api.md; a missing one is a
# warning, so ``sphinx-build -W`` fails until the API page is updated.
_API_PACKAGES = (
    "scinfl",
    "scinfl.model",
    "scinfl.module",
    "scinfl.federated",
    "scinfl.federated.flower",
    "scinfl.data",
    "scinfl.tl",
    "scinfl.pl",
)


def _check_api_coverage(app) -> None:
    import importlib
    import re
    from pathlib import Path

    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    api_page = Path(app.srcdir) / "api.md"
    text = api_page.read_text()
    for package in _API_PACKAGES:
        module = importlib.import_module(package)
        prefix = "" if package == "scinfl" else package.removeprefix("scinfl.") + "."
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if package == "scinfl" and type(obj).__name__ == "module":
                continue  # subpackages are documented section by section
            if not re.search(rf"(?<![\w.])(?:scinfl\.)?{re.escape(prefix + name)}\b", text):
                logger.warning(
                    "%s.%s is public (in __all__) but not listed in %s", package, name, api_page
                )


def setup(app):
    app.connect("builder-inited", _check_api_coverage)
