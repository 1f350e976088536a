import pytest
import scvi


@pytest.fixture
def key():
    import scinfl

    return scinfl.Key.generate()


@pytest.fixture
def counts_adata():
    import scinfl

    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=30, n_labels=3, n_sites=3, seed=1)
    return adata


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
    yield
