import math

import pytest
import torch

from mnistlab import models
from mnistlab.errors import MnistlabError


def test_seed003_matches_keras_parameter_count_and_output_shape():
    net = models.create_model("seed003")
    # Keras's model.summary() for Chollet's convnet: 93,322 total, of which the conv part is 55,744.
    assert models.count_params(net) == {"total": 93_322, "trainable": 93_322, "non_trainable": 0}
    conv_part = sum(p.numel() for m in net if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    assert conv_part == 55_744
    assert net(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_keras_initialisers_glorot_uniform_kernels_zero_biases():
    torch.manual_seed(0)
    net = models.create_model("seed003")
    for layer in net:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            w = layer.weight
            receptive = w[0, 0].numel() if w.dim() == 4 else 1
            limit = math.sqrt(6 / ((w.shape[0] + w.shape[1]) * receptive))
            assert w.abs().max() <= limit
            assert w.abs().max() > 0.9 * limit  # uniform over the whole range, not a smaller init
            assert torch.all(layer.bias == 0)


def test_unknown_model_and_hyperparameter_are_clear_errors():
    with pytest.raises(MnistlabError, match="unknown model 'nope'.*seed003"):
        models.create_model("nope")
    with pytest.raises(MnistlabError, match="no hyperparameter width"):
        models.create_model("seed003", width=3)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    net = models.create_model("seed003")
    arch = models.Architecture("seed003", {}, 10, [str(i) for i in range(10)], "mnist")
    models.save_model(net, arch, tmp_path)
    loaded, loaded_arch = models.load_model(tmp_path)
    assert loaded_arch == arch
    x = torch.rand(3, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), loaded(x))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_corrupt_or_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(MnistlabError, match="has no model.json"):
        models.load_model(tmp_path)
    net = models.create_model("seed003")
    models.save_model(net, models.Architecture("seed003", {}, 10, list("0123456789"), "mnist"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(MnistlabError, match="cannot load the model"):
        models.load_model(tmp_path)
