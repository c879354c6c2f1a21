import math

import pytest
import torch

from mnistlab import kernels, models
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


# Keras's model.summary() totals for the same models (BatchNorm's moving mean and variance are
# non-trainable parameters there, 2 per channel).
KERAS_PARAMS = {
    "seed000": (1_446_602, 1_444_298, 2_304),
    "seed001": (599_754, 599_754, 0),
    "seed002": (887_530, 887_530, 0),
    "seed003": (93_322, 93_322, 0),
    "seed004": (485_514, 485_514, 0),
}


@pytest.mark.parametrize("name", sorted(KERAS_PARAMS))
def test_every_seed_model_matches_keras_parameter_counts(name):
    net = models.create_model(name)
    total, trainable, non_trainable = KERAS_PARAMS[name]
    assert models.count_params(net) == {"total": total, "trainable": trainable, "non_trainable": non_trainable}
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    text = models.summary(net, name)
    assert f"Total params: {total:,}" in text and f"Non-trainable params: {non_trainable:,}" in text


def test_seed001_is_built_from_the_tuner_hyperparameters():
    largest = models.create_model("seed001", conv_1_filter=128, conv_1_kernel=5, conv_2_filter=64,
                                  conv_2_kernel=5, dense_1_units=128)
    assert models.count_params(largest)["total"] == 3_486_410  # Keras: 3,328 + 204,864 + 3,276,928 + 1,290
    with pytest.raises(MnistlabError, match="conv_1_filter=40 is outside"):
        models.create_model("seed001", conv_1_filter=40)
    with pytest.raises(MnistlabError, match="conv_2_kernel=4 is outside"):
        models.create_model("seed001", conv_2_kernel=4)


def test_batchnorm_uses_keras_settings():
    bns = [m for m in models.create_model("seed000").modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 6
    assert all(m.eps == 1e-3 and m.momentum == pytest.approx(0.01) for m in bns)  # Keras momentum 0.99


def test_summary_reads_like_keras():
    text = models.summary(models.create_model("seed003"), "seed003")
    lines = text.splitlines()
    assert lines[0] == 'Model: "seed003"'
    rows = [line for line in lines if "(None" in line]
    names = [row.split()[0] for row in rows]
    assert names == ["conv2d", "max_pooling2d", "conv2d_1", "max_pooling2d_1", "conv2d_2", "flatten", "dense", "dense_1"]
    assert "(None, 26, 26, 32)" in rows[0] and rows[0].rstrip().endswith("320")
    assert "(None, 576)" in rows[5] and rows[6].rstrip().endswith("36,928")


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    models.save_model(models.create_model("seed003"), models.Architecture("seed003", {}, 10, list("0123456789"), "mnist"),
                      tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "model.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_best_takes_its_dropout_rate_as_a_hyperparameter():
    rates = lambda net: [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates(models.create_model("best")) == [0.4, 0.4, 0.4]  # the recipe's, as before
    lighter = models.create_model("best", dropout=0.2)
    assert rates(lighter) == [0.2, 0.2, 0.2]
    assert models.count_params(lighter)["total"] == 327_242


@pytest.mark.parametrize("name", ["seed003", "seed002", "seed004", "seed000", "fast"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_net_is_the_same_function_and_gradients_to_a_rounding_on_shared_weights(name, precision):
    torch.manual_seed(0)
    net = models.create_model(name).eval()  # eval: no dropout, so both orders see the same masks
    fast = models.fused(net)
    kinds = [type(m).__name__ for m in fast]
    assert "MaxPool2d" not in kinds and ("MaxPoolReLU" in kinds or "ConvPoolReLU" in kinds)  # every pooling fused
    assert all(not (a in ("MaxPoolReLU", "ConvPoolReLU") and b == "ReLU") for a, b in zip(kinds, kinds[1:]))
    # a 1-channel 3x3 convolution, then ReLU and pooling; or fast's space-to-depth, convolution and pooling: one
    # kernel (fast's in fp32 only: under bf16 autocast its ConvPoolReLU runs torch's three layers)
    assert (kinds[0] == "ConvPoolReLU") == (name in ("seed003", "seed004", "fast"))
    first_native = name in ("seed003", "seed004") or name == "fast" and precision == "fp32"
    # every BatchNorm2d with a ReLU just before or after it: one kernels.BatchNormReLU (training only: eval here)
    assert "BatchNorm2d" not in kinds and ("BatchNormReLU" in kinds) == (name in ("seed000", "fast"))
    if name in ("seed003", "seed002", "seed004"):  # a ReLU before each pooling: moved after it, then fused
        assert all(m.relu for m in fast.modules() if isinstance(m, kernels.MaxPoolReLU))
    # a valid 3x3 convolution with a pooling after it: one module (one Winograd pass in fp32)
    assert ("WinogradPoolReLU" in kinds) == (name in ("seed003", "seed004"))
    # a Flatten with a Linear after it: one module that reads the channels_last input in place (its sums in
    # another order where the input is not also contiguous: 1x1 images, as fast's, are)
    assert "FlattenLinear" in kinds and "Flatten" not in kinds
    error = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert [type(m) for m in net] != [type(m) for m in fast]  # the model as written keeps its order
    mine, theirs = list(fast.parameters()), list(net.parameters())
    assert len(mine) == len(theirs) > 0 and all(a is b for a, b in zip(mine, theirs))  # shared, not copied
    own = set()  # parameters of the convolutions whose weight gradient is mnistlab's: kernels.c's or a matmul
    upstream = set()  # parameters before a convolution whose input gradient is mnistlab's: a matmul and col2im
    winograd = []  # convolutions computed by kernels.c's Winograd (fp32, channels in 8s and 16s): another rounding

    def summed_by_mnistlab(module, inputs):
        patch = module.conv if isinstance(module, kernels.WinogradPoolReLU) else module  # its PatchMatmulConv
        k = patch.conv.kernel_size[0]
        outputs = (inputs[0].shape[-1] - k + 1) * (inputs[0].shape[-2] - k + 1)
        small = outputs <= patch.SMALL_OUTPUT
        dtype = kernels.compute_dtype(inputs[0])
        if small or kernels.native_weight_grad(dtype, patch.conv.weight):
            own.update(id(p) for p in patch.conv.parameters())
        by_winograd = outputs > patch.COL2IM_OVER_WINOGRAD and kernels.winograd(dtype, patch.conv.weight) \
            and kernels.winograd(dtype, patch.conv.weight.transpose(0, 1))
        if small and not by_winograd and kernels.col2im_input_grad(dtype, patch.conv.weight):
            upstream.update(id(p) for before in fast[:list(fast).index(module)] for p in before.parameters())
        if kernels.winograd(dtype, patch.conv.weight):
            winograd.append(module)
    for module in fast:
        if isinstance(module, (kernels.PatchMatmulConv, kernels.WinogradPoolReLU)):
            module.register_forward_pre_hook(summed_by_mnistlab)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    grads = []
    for order, cast in ((net.to(memory_format=torch.channels_last), False), (net, precision == "bf16"),
                        (fast, precision == "bf16")):
        order.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=cast):
            out = order(x)
        out.float().square().sum().backward()
        grads.append((out.detach().float(), [p.grad.clone() for p in net.parameters()]))
    (exact, exact_grads), (model, model_grads), (fused, fused_grads) = grads
    # the matmul: seed003's third conv (3x3 out), fast's last two; kernels.c's, in fp32: every 3x3 but seed002's (padded)
    assert bool(own) == (name in ("seed003", "fast") or precision == "fp32" and name != "seed002")
    # col2im, in fp32, where an output is small: seed003's third conv (3x3), fast's last (2x2), best's last (1x1)
    assert bool(upstream) == (precision == "fp32" and name in ("seed003", "fast", "best"))
    # Winograd's forward, in fp32, for 3x3 convolutions with channels in 8s and 16s
    assert bool(winograd) == (precision == "fp32" and name in ("seed000", "seed001", "seed003", "seed004", "fast", "best"))
    if not first_native and not winograd:  # the same forward, bit for bit; or with the dense layer's sums reordered
        assert torch.equal(model, fused) or "FlattenLinear" in kinds and error(fused, model) < (1e-2 if precision == "bf16" else 1e-6)
        for p, a, b in zip(net.parameters(), model_grads, fused_grads):
            if id(p) in own | upstream or "FlattenLinear" in kinds:  # summed in another order: equal to a rounding
                assert ((a - b).norm() / b.norm()).item() < (1e-2 if precision == "bf16" else 1e-5)
            else:
                assert torch.equal(a, b)
        return
    # The native first layer computes in fp32 (autocast rounds its input and weights to bf16 first), and
    # Winograd rounds otherwise than oneDNN: in fp32 the same to a rounding; in bf16 as close to fp32 as autocast's model, within bf16's noise.
    if precision == "fp32":
        assert error(fused, exact) < 1e-5
        assert all(error(a, b) < 1e-4 for a, b in zip(fused_grads, exact_grads))
    else:
        assert 0 < error(fused, exact) < 1.5 * error(model, exact) < 2e-2
        assert all(error(a, b) < 1.5 * error(c, b) + 1e-3 for a, c, b in zip(fused_grads, model_grads, exact_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_the_rate_scale_layout_and_generator_of_nn_dropout(dtype):
    layer = models.Dropout(0.4)
    x = torch.ones(64, 32, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)
    y = layer(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(1 / 0.6, dtype=dtype)
    assert set(y.detach().unique().tolist()) == {0.0, scale.item()}  # dropped, or kept and scaled as nn.Dropout
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.6) < 0.005  # 401k draws: the standard error is under 0.001
    rows = (y != 0).float().mean(dim=(0, 2, 3))  # every channel, not a pattern over the layout
    assert rows.min() > 0.55 and rows.max() < 0.65
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)  # torch.manual_seed makes it repeatable
    assert not torch.equal(layer(x), y)
    assert torch.equal(layer.eval()(x), x)  # identity in eval mode
    flat = models.Dropout(0.25).train()(torch.ones(100_000))
    assert abs((flat != 0).float().mean().item() - 0.75) < 0.01


def test_zoo_models_use_the_fast_dropout_and_summaries_still_name_it():
    net = models.create_model("best")
    assert [type(m) for m in net if isinstance(m, torch.nn.Dropout)] == [models.Dropout] * 3
    assert "(Dropout)" in models.summary(net)


def slant_and_centre(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, in pixels: d(column of ink)/d(row), by least squares over the ink, and the ink's centre."""
    ink = images[:, 0].double()
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = ink.sum((1, 2))
    r = (ink * rows).sum((1, 2)) / mass
    c = (ink * cols).sum((1, 2)) / mass
    dr, dc = rows - r[:, None, None], cols - c[:, None, None]
    return (ink * dr * dc).sum((1, 2)) / (ink * dr * dr).sum((1, 2)), torch.stack([r, c], 1)


def test_deskew_straightens_slanted_strokes_and_leaves_upright_ones_alone():
    images = torch.zeros(4, 1, 28, 28)
    for i, lean in enumerate((0.0, 0.5, -0.3, 0.8)):  # a 3-pixel-wide stroke, `lean` columns per row
        for row in range(4, 24):
            col = 13 + lean * (row - 14)
            images[i, 0, row, round(col) - 1:round(col) + 2] = 1.0
    before, centre_before = slant_and_centre(images)
    assert before[1:].abs().min() > 0.25  # the test's strokes really lean
    out = models.Deskew()(images)
    after, centre_after = slant_and_centre(out)
    assert torch.allclose(out[0], images[0], atol=1e-5)  # upright: resampled at its own pixels
    assert after.abs().max() < 0.05 * before.abs().max()
    assert torch.allclose(out.sum((1, 2, 3)), images.sum((1, 2, 3)), rtol=1e-4)  # no ink lost off the edges
    assert (centre_after - centre_before).abs().max() < 0.05  # a shear about the centre: shifts survive


def test_deskew_passes_blank_images_and_keeps_layout_and_dtype():
    blank = models.to_input(torch.zeros(3, 28, 28, dtype=torch.uint8))
    out = models.Deskew()(blank)
    assert torch.equal(out, blank) and out.stride() == blank.stride()
    half = models.Deskew()(torch.rand(2, 1, 28, 28).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


def test_best_deskew_is_best_after_a_deskew_layer():
    plain, deskewed = models.create_model("best"), models.create_model("best_deskew")
    assert models.count_params(deskewed) == models.count_params(plain)  # Deskew has no weights
    assert isinstance(deskewed[0], models.Deskew)
    torch.nn.Sequential(*deskewed[1:]).load_state_dict(plain.state_dict())  # shares its modules, numbered from 0
    plain.eval()
    deskewed.eval()
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(deskewed(images), plain(models.Deskew()(images)))


def test_flatten_linear_reads_a_channels_last_input_in_place_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    flatten, linear = torch.nn.Flatten(), torch.nn.Linear(64 * 3 * 3, 10)
    layer = models.FlattenLinear(flatten, linear)
    x0 = torch.randn(16, 64, 3, 3)
    results = []
    for x, way in ((x0.contiguous(memory_format=torch.channels_last), layer), (x0, layer), (x0, lambda x: linear(flatten(x)))):
        x = x.clone().requires_grad_()
        linear.zero_grad()
        y = way(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, linear.weight.grad.clone(), linear.bias.grad.clone()))
    in_place, plain, reference = results
    assert all(torch.equal(a, b) for a, b in zip(plain, reference))  # a contiguous input: the two as written
    assert not torch.equal(in_place[0], reference[0])  # channels_last: the same terms summed in another order
    for a, b in zip(in_place, reference):
        assert ((a - b).norm() <= 1e-6 * b.norm()).item()
    assert in_place[1].is_contiguous(memory_format=torch.channels_last)  # its gradient keeps the input's layout
    x = x0.contiguous(memory_format=torch.channels_last)
    stepping = lambda: layer(x.clone().requires_grad_()).detach()  # a training step's: the weight permuted afresh
    evaluating = torch.no_grad()(lambda: layer(x))  # evaluation keeps the permuted weight until the weight changes
    assert torch.equal(evaluating(), in_place[0]) and torch.equal(evaluating(), in_place[0])
    with torch.no_grad():
        linear.weight.mul_(2)  # in place (an optimizer step, load_state_dict): permuted again
    assert torch.equal(evaluating(), stepping()) and not torch.equal(evaluating(), in_place[0])
    linear.weight = torch.nn.Parameter(torch.zeros_like(linear.weight))  # another tensor: permuted again
    assert torch.equal(evaluating(), linear.bias.detach().expand(16, 10))
    with pytest.raises(RuntimeError):  # a wrong size fails as torch's Linear does
        layer(torch.randn(2, 32, 3, 3).contiguous(memory_format=torch.channels_last))
