import json
import os
import stat

import numpy as np
import pytest

import scinfl
from scinfl import Key, KeyFileError


def test_generate_is_random_and_versioned():
    a, b = Key.generate(), Key.generate()
    assert a != b
    assert a.fingerprint != b.fingerprint
    assert a.version == 1
    assert len(a._seed) * 8 >= 128


def test_coordinates_are_deterministic_and_domain_separated(key):
    c1 = key.coordinates(128, purpose="pooled")
    assert c1.shape == (128, 2) and c1.dtype == np.float32
    assert np.array_equal(c1, key.coordinates(128, purpose="pooled"))
    assert not np.allclose(c1, key.coordinates(128, purpose="features"))
    assert c1.min() >= -1 and c1.max() <= 1


def test_repr_never_shows_the_secret(key):
    text = repr(key) + str(key)
    assert key._seed.hex() not in text
    assert key.fingerprint in text


def test_fingerprint_does_not_contain_seed_material(key):
    assert key.fingerprint not in key._seed.hex()


def test_save_load_roundtrip_with_private_permissions(tmp_path, key):
    path = key.save(tmp_path / "site.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Key.load(path) == key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scinfl-key-")]


def test_a_home_relative_path_is_the_users_home(tmp_path, key, monkeypatch):
    # a folder literally named "~" in the working directory held the secret before
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    key.save("~/fed/site.key")
    assert (tmp_path / "home" / "fed" / "site.key").is_file() and not (tmp_path / "~").exists()
    assert Key.load("~/fed/site.key") == key
    with pytest.raises(IsADirectoryError, match="is a folder"):
        key.save(tmp_path, overwrite=True)


def test_save_refuses_to_overwrite(tmp_path, key):
    path = key.save(tmp_path / "site.key")
    other = Key.generate()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(path)
    assert Key.load(path) == key
    other.save(path, overwrite=True)
    assert Key.load(path) == other


def test_load_rejects_missing_foreign_and_corrupt_files(tmp_path, key):
    with pytest.raises(KeyFileError, match="No key file"):
        Key.load(tmp_path / "absent.key")
    foreign = tmp_path / "foreign.key"
    foreign.write_text('{"hello": 1}')
    with pytest.raises(KeyFileError, match="not a scinfl key"):
        Key.load(foreign)
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(KeyFileError, match="not a scinfl key"):
        Key.load(binary)
    path = key.save(tmp_path / "site.key")
    payload = json.loads(path.read_text())
    payload["seed"] = payload["seed"][:-2] + ("00" if payload["seed"][-2:] != "00" else "11")
    tampered = tmp_path / "tampered.key"
    tampered.write_text(json.dumps(payload))
    with pytest.raises(KeyFileError, match="corrupt"):
        Key.load(tampered)


def test_rotate_bumps_version(key):
    new = key.rotate()
    assert new.version == key.version + 1
    assert new.fingerprint != key.fingerprint


def test_public_api_exports():
    assert scinfl.Key is Key


def test_a_seed_that_is_not_bytes_says_so():
    with pytest.raises(TypeError, match="A key seed is bytes, got str"):
        Key("0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Key(b"short")


def test_a_pickled_model_holds_no_key_and_a_copy_keeps_it():
    import copy
    import io
    import pickle

    import torch

    import scinfl

    adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=8, n_sites=2, n_labels=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    key = scinfl.Key.generate()
    model = scinfl.model.INFL(adata, key=key, n_hidden=8)
    coordinates = model.module.key_encoder.coordinates.numpy().tobytes()
    blob = pickle.dumps(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for written in (blob, buffer.getvalue()):
        assert key._seed not in written and coordinates[:64] not in written
    restored = pickle.loads(blob)
    assert not restored.has_key and not restored.module.has_key
    restored.set_key(key)  # the same model once the key is back
    torch.testing.assert_close(restored.module.state_dict(), model.module.state_dict())
    assert copy.deepcopy(model).has_key and copy.copy(model).has_key and model.has_key
