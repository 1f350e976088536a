"""scinfl leaves the process's global state (random generators, root logger) to the user."""

from __future__ import annotations

import logging

import numpy as np
import torch

import scinfl


def test_training_does_not_reset_the_users_random_draws():
    adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=12, n_sites=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    latents = []
    for _ in range(2):  # replicates in a loop, no seed set in between
        model = scinfl.model.INFL(adata, key_mode=None, n_hidden=16)
        model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
        latents.append(model.get_latent_representation())
    assert not np.allclose(latents[0], latents[1])
    draws = []
    for seed in (123, 456):
        torch.manual_seed(seed)
        model.train_centralized(max_epochs=1, batch_size=32, progress_bar=False)
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    labelled = scinfl.model.INFL(adata, key_mode=None, n_hidden=16)
    for trained in (model, labelled):  # the classifier's check after training draws too
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        trained.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
        assert torch.equal(torch.rand(3), expected)  # as if training had not drawn at all


def test_building_a_mudata_leaves_the_root_logger_unconfigured():
    """mudata's option context logs with logging.info, which would run basicConfig."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # as in a fresh notebook (pytest adds its own)
    try:
        scinfl.data.synthetic_multiome(n_obs=40)
        assert root.handlers == []
    finally:
        root.handlers[:] = saved
