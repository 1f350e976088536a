import io
import logging

import pytest
import torch
from scvi import REGISTRY_KEYS

import scinfl.module
from scinfl import Key, MissingKeyError
from scinfl.key import MISSING_KEY_MESSAGE
from scinfl.module import (
    KEY_MODES,
    CoordinateKeyEncoder,
    KeyedVAE,
    KeyMode,
    ModelKeyMode,
    PooledKeyedLinear,
    keyify,
)


def _tensors(n=8, p=20, n_labels=3):
    return {
        REGISTRY_KEYS.X_KEY: torch.poisson(torch.rand(n, p) * 4),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(n, 1, dtype=torch.long),
        REGISTRY_KEYS.LABELS_KEY: torch.randint(0, n_labels, (n, 1)),
    }


def test_keyify_swaps_every_linear_and_is_identity_at_init():
    enc = CoordinateKeyEncoder()
    enc.set_coordinates(torch.rand(128, 2) * 2 - 1)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(5, 2))
    )
    x = torch.randn(4, 6)
    before = net(x)
    keyify(net, enc, key_strength=3.0)
    assert isinstance(net[0], PooledKeyedLinear) and isinstance(net[2][0], PooledKeyedLinear)
    assert sum(isinstance(m, PooledKeyedLinear) for m in net.modules()) == 2
    torch.testing.assert_close(net(x), before)


def test_keyed_layer_depends_on_key_after_training_signal():
    enc = CoordinateKeyEncoder()
    layer = PooledKeyedLinear.from_linear(torch.nn.Linear(4, 3), key_source=enc, key_strength=5.0)
    torch.nn.init.normal_(layer.scale_out.weight)
    torch.nn.init.normal_(layer.film_out.weight)
    x = torch.randn(2, 4)
    enc.set_coordinates(torch.from_numpy(Key.generate().coordinates(128)))
    y1 = layer(x)
    enc.set_coordinates(torch.from_numpy(Key.generate().coordinates(128)))
    assert not torch.allclose(y1, layer(x))


def test_key_absent_from_state_dict_and_checkpoint(key):
    vae = KeyedVAE(n_input=20, n_labels=3, classify=True)
    vae.set_key(key)
    coords = vae.key_encoder.coordinates.clone()
    state = vae.state_dict()
    assert not [name for name in state if "coordinates" in name]
    assert "class_order" not in state  # the key's class order stays with the key
    for tensor in state.values():
        if tensor.shape == coords.shape:
            assert not torch.allclose(tensor, coords)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert coords.numpy().tobytes() not in buffer.getvalue()


def test_forward_without_key_raises():
    vae = KeyedVAE(n_input=20)
    with pytest.raises(MissingKeyError, match="set_key"):
        vae(_tensors())
    classifier = KeyedVAE(n_input=20, n_labels=3, classify=True)
    with pytest.raises(MissingKeyError) as raised:
        classifier.classification_logits(torch.zeros(2, classifier.n_latent))
    assert str(raised.value) == MISSING_KEY_MESSAGE  # one message for every missing key


def test_superseded_key_modes_are_experimental_and_say_so(caplog):
    from scinfl.module import experimental

    public = set(scinfl.module.__all__)
    assert not public & set(experimental.__all__)
    assert {"feature", "feature-inr"} < set(KEY_MODES)
    for name in ("pooled", "feature", "feature-inr"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scinfl.module"):
            vae = KeyedVAE(n_input=20, key_mode=name)
        assert isinstance(vae._key_mode, KeyMode)
        superseded = name != "pooled"
        # only the per-feature modes key the decoder too, and they are superseded
        assert isinstance(vae._key_mode, ModelKeyMode) == superseded
        assert ("superseded" in caplog.text) == superseded


def test_normal_likelihood_masks_missing_values(key):
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=20, gene_likelihood="normal")
    vae.set_key(key)
    vae.eval()
    tensors = _tensors()
    x = torch.randn(8, 20)
    x[:, :5] = float("nan")
    tensors[REGISTRY_KEYS.X_KEY] = x
    _, gen, loss = vae(tensors)
    assert torch.isfinite(loss.loss)
    # the loss of a row does not depend on what is (not) behind its missing entries
    x_other = x.clone()
    x_other[:, :5] = 0.0
    px = gen["px"]
    masked = vae.reconstruction_loss(x, px)
    observed_only = -px.log_prob(x_other)[:, 5:].sum(-1)
    torch.testing.assert_close(masked, observed_only)


def test_key_parameters_are_a_small_share():
    # the key's layers are a fixed ~18k parameters: 3.4% of a 2,000-gene model, 8.4% of a
    # 765-gene one (pbmc68k) since the decoder heads the likelihood never reads are gone
    vae = KeyedVAE(n_input=2000, n_labels=10, classify=True)
    names = vae.key_parameter_names()
    params = dict(vae.named_parameters())
    share = sum(params[n].numel() for n in names) / sum(p.numel() for p in params.values())
    assert names and share <= 0.05
