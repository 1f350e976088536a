"""SiteData's train/validation split: its size rule, stratification by label, fallbacks."""

import numpy as np
import pytest

from scinfl.federated import SiteData


def _split(labels, validation_size, seed):
    n = len(labels)
    return SiteData.from_arrays(
        "a", np.zeros((n, 2)), labels=labels, validation_size=validation_size, seed=seed
    )


@pytest.mark.parametrize("labels", [None, np.zeros(30, dtype=np.int64)])
def test_without_labels_the_split_is_random_as_before(labels):
    # no labels, or a single class: the seeded random permutation of earlier releases
    for seed in range(5):
        site = SiteData.from_arrays(
            "a", np.zeros((30, 2)), labels=labels, validation_size=0.2, seed=seed
        )
        perm = np.random.default_rng(seed).permutation(30)
        assert site.val_idx.tolist() == sorted(perm[:6].tolist())
        assert site.train_idx.tolist() == sorted(perm[6:].tolist())


def test_split_is_stratified_by_label():
    labels = np.repeat([0, 1, 2], [30, 20, 10])
    splits = set()
    for seed in range(10):
        site = _split(labels, 0.2, seed)
        assert np.bincount(labels[site.val_idx], minlength=3).tolist() == [6, 4, 2]
        assert np.bincount(labels[site.train_idx], minlength=3).tolist() == [24, 16, 8]
        splits.add(tuple(site.val_idx))
        again = _split(labels, 0.2, seed)
        assert again.val_idx.tolist() == site.val_idx.tolist()
    assert len(splits) == 10  # the seed matters


def test_small_site_keeps_every_class_in_training():
    # a site of a small cohort: rare classes of one or two rows
    labels = np.array([0] * 8 + [1] * 2 + [2] + [3] * 2)
    for seed in range(50):
        site = _split(labels, 0.2, seed)
        assert site.n_val == SiteData.n_validation(13, 0.2) == 3
        assert set(labels[site.train_idx]) == {0, 1, 2, 3}
    # every class has two rows, but one validation row cannot hold four classes
    labels = np.repeat([0, 1, 2, 3], [5, 2, 2, 2])
    for seed in range(50):
        site = _split(labels, 0.1, seed)
        assert site.n_val == 1
        assert set(labels[site.train_idx]) == {0, 1, 2, 3}


def test_fallback_keeps_the_number_of_validation_rows():
    # 11 classes, 10 training rows: one class must go; the size rule still holds
    labels = np.array(list(range(10)) + [10] * 10)
    for seed in range(20):
        site = _split(labels, 0.5, seed)
        assert (site.n_train, site.n_val) == (10, 10)
        assert len(set(labels[site.train_idx])) == 10


@pytest.mark.parametrize("validation_size", [0.0, 0.1, 0.25])
def test_training_size_depends_on_the_site_size_only(validation_size):
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        for seed in range(3):
            labels = rng.integers(0, 4, n)
            site = _split(labels, validation_size, seed)
            assert site.n_val == SiteData.n_validation(n, validation_size)
            assert site.n_train + site.n_val == n
            assert sorted(site.train_idx.tolist() + site.val_idx.tolist()) == list(range(n))
