"""Settings shared by the tests (``tests/``) and the docstring examples collected under ``src/``."""

import logging
import os

# one thread: the tests and examples use tiny data, where more threads only compete for cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util

import pytest
import scvi
import torch

torch.set_num_threads(1)

# the Flower engine's examples need the optional `flower` extra
collect_ignore_glob = (
    [] if importlib.util.find_spec("flwr") else ["src/scinfl/federated/flower/*.py"]
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread, whatever a library called before it left behind."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_scvi_in_doctests(request):
    """scvi-tools logs through rich to stdout, which a doctest would read as output."""
    if isinstance(request.node, pytest.DoctestItem):
        verbosity = scvi.settings.verbosity
        scvi.settings.verbosity = logging.WARNING
        yield
        scvi.settings.verbosity = verbosity
    else:
        yield


@pytest.fixture(scope="session")
def _example_models() -> dict:
    """A small trained model of each class, for the examples of their methods (built once).

    ``scinfl.model._infl``'s examples see ``adata`` and ``model`` (an :class:`INFL` with
    labels), ``_perturbation``'s a :class:`PerturbationINFL` and its data, ``_multiomics``'s
    ``mdata`` and a :class:`MultiOmicsINFL`: what each class docstring's example builds.
    """
    import scinfl

    settings = {"max_rounds": 2, "batch_size": 32, "progress_bar": False, "seed": 0}
    adata = scinfl.data.synthetic_counts(n_obs=300, n_vars=40, n_sites=3, seed=0)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    infl = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    infl.train_federated(**settings)
    perturbed = scinfl.data.synthetic_perturbation(n_obs=200, n_vars=24)
    scinfl.model.PerturbationINFL.setup_anndata(
        perturbed, condition_key="condition", site_key="site"
    )
    perturbation = scinfl.model.PerturbationINFL(perturbed, key=scinfl.Key.generate(), n_hidden=16)
    perturbation.train_federated(**settings)
    mdata = scinfl.data.synthetic_multiome(n_obs=120, n_sites=3, seed=0)
    scinfl.model.MultiOmicsINFL.setup_mudata(mdata, modalities=["rna", "prot"], site_key="site")
    multiomics = scinfl.model.MultiOmicsINFL(mdata, key=scinfl.Key.generate(), n_hidden=16)
    multiomics.train_federated(**settings)
    return {
        "_infl": {"adata": adata, "model": infl},
        "_perturbation": {"adata": perturbed, "model": perturbation},
        "_multiomics": {"mdata": mdata, "model": multiomics},
    }


@pytest.fixture(autouse=True)
def _models_in_model_examples(request):
    """The examples of a model class's methods start from its trained model (see above)."""
    names = request.node.name.split(".") if isinstance(request.node, pytest.DoctestItem) else []
    found = names[names.index("model") + 1] if "model" in names[:-1] else None
    if found not in ("_infl", "_perturbation", "_multiomics"):
        yield
        return
    namespace = request.getfixturevalue("doctest_namespace")
    objects = request.getfixturevalue("_example_models")[found]
    namespace.update(objects)
    yield
    for name in objects:  # no other example may lean on them
        namespace.pop(name, None)
