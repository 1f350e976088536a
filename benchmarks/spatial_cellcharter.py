"""CellCharter's rows of the spatial table (the peer users would pick), centralized.

CellCharter 0.3.7: scVI's latent of all spots pooled (10 dimensions, 50 epochs, the sections as
scVI's batch; negative binomial on the synthetic counts, normal on cSCC's ``log1p``), neighbour
aggregation over 3 hop rings of the same per-site graph the INFL rows use
(``cc.gr.aggregate_neighbors``), and CellCharter's Gaussian mixture with the true number of
domains (``cc.tl.Cluster``). Same data, seeds and scores as ``benchmarks/spatial.py``, which
puts these rows in its table when ``results/spatial_cellcharter.csv`` exists.

CellCharter is in the ``benchmarks`` dependency group (with this stack: scvi-tools 1.4.2, the
CPU torch wheel)::

    uv pip install -e . --group benchmarks
    python benchmarks/spatial_cellcharter.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pandas as pd
import scvi
import spatial as bench  # benchmarks/spatial.py: a script's folder is on sys.path
import torch

HERE = Path(__file__).parent
METHOD = "CellCharter (scVI, L=3, GMM; centralized)"


def run(name: str, seed: int, epochs: int) -> dict:
    """CellCharter on one data set with one seed: its scores."""
    import cellcharter as cc

    adata, truth, layer, likelihood, k = bench.load(name)
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, layer=layer, batch_key="site")
    model = scvi.model.SCVI(adata, n_latent=10, gene_likelihood=likelihood)
    model.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
    adata.obsm["X_scVI"] = model.get_latent_representation()
    cc.gr.aggregate_neighbors(adata, n_layers=bench.N_LAYERS, use_rep="X_scVI", sample_key="site")
    gmm = cc.tl.Cluster(n_clusters=k, random_state=seed, trainer_params={"accelerator": "cpu"})
    gmm.fit(adata, use_rep="X_cellcharter")
    labels = gmm.predict(adata, use_rep="X_cellcharter").astype(str)
    return {"data": name, "seed": seed, "method": METHOD, **bench.scores(adata, truth, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["synthetic", "cscc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "spatial_cellcharter.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for name in args.data:
        for seed in args.seeds:
            rows.append(run(name, seed, args.epochs))
            logging.info("%s", rows[-1])
            pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
