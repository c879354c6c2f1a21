import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from mnistlab import kernels, models


def aten(x, relu):
    y = F.max_pool2d(x, 2)
    return F.relu(y) if relu else y


def pooled_and_grads(pool, x0, g):
    x = x0.clone().requires_grad_()
    y = pool(x)
    y.backward(g)
    return y.detach(), x.grad


def test_the_kernel_is_built_and_shares_torchs_openmp_on_linux():
    if sys.platform != "linux":
        pytest.skip("the native kernel is built on Linux only")
    runtimes = kernels.openmp_runtimes()
    assert kernels.library() is not None  # CI has a C compiler: the fused path is what the tests exercise
    assert kernels.openmp_runtimes() == runtimes  # no second thread pool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(64, 32, 26, 26), (5, 64, 11, 11), (3, 7, 9, 4), (2, 1, 28, 28)])
def test_fused_pooling_equals_aten_bit_for_bit_ties_nan_and_odd_sizes_included(dtype, relu, shape):
    assert kernels.library() is not None
    torch.manual_seed(0)
    x0 = ((torch.randn(shape) * 2).round() / 2).to(dtype)  # rounded: many ties, zeros and negatives
    x0[0, 0, :4] = 0.25  # a flat region, as a digit's background gives
    x0.view(-1)[::97] = float("nan")
    x0 = x0.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    fused, ref = pooled_and_grads(kernels.MaxPoolReLU(relu), x0, g), pooled_and_grads(lambda t: aten(t, relu), x0, g)
    assert torch.equal(fused[0].isnan(), ref[0].isnan())
    assert torch.equal(fused[0].nan_to_num(), ref[0].nan_to_num())
    assert torch.equal(fused[1], ref[1])
    assert fused[0].is_contiguous(memory_format=torch.channels_last) and fused[1].dtype == dtype


def test_other_layouts_devices_and_dtypes_take_atens_pooling(monkeypatch):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)  # neither bf16 nor fp32, and not channels_last
    calls = []
    monkeypatch.setattr(kernels._PoolReLU, "apply", lambda *a: calls.append(a))
    assert torch.equal(kernels.MaxPoolReLU(True)(x), aten(x, True))
    assert torch.equal(kernels.MaxPoolReLU(False)(x.float()), aten(x.float(), False))  # contiguous NCHW
    assert calls == []


def test_only_plain_2x2_poolings_are_fused():
    assert kernels.fusable(torch.nn.MaxPool2d(2)) and kernels.fusable(torch.nn.MaxPool2d((2, 2), stride=2))
    for other in (torch.nn.MaxPool2d(3), torch.nn.MaxPool2d(2, stride=1), torch.nn.MaxPool2d(2, padding=1),
                  torch.nn.MaxPool2d(2, ceil_mode=True), torch.nn.MaxPool2d(2, return_indices=True),
                  torch.nn.AvgPool2d(2), torch.nn.ReLU()):
        assert not kernels.fusable(other)


def test_without_a_compiler_the_build_says_why_and_training_falls_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C compiler"):
        kernels.build()
    monkeypatch.setenv("CC", "false")  # a compiler that fails: nothing half-written is left behind
    with pytest.raises(RuntimeError, match="failed"):
        kernels.build()
    assert not list((tmp_path / "kernels").glob("*"))
    kernels.library.cache_clear()
    try:
        if sys.platform == "linux":
            capsys.readouterr()
            assert kernels.library() is None
            note = capsys.readouterr().err
            assert note.count("\n") == 1 and "exit code 1" in note and "PyTorch's convolution, pooling and RMSprop run instead" in note
        x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
        assert torch.equal(kernels.MaxPoolReLU(True)(x), aten(x, True))
        kernels.library.cache_clear()
        monkeypatch.setenv("MNISTLAB_KERNELS", "0")
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()  # the next test builds (or finds) the real one again


def test_a_built_kernel_is_reused_from_the_cache(monkeypatch, tmp_path):
    if sys.platform != "linux":
        pytest.skip("the native kernel is built on Linux only")
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path))
    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp and first.parent == tmp_path / "kernels"


def test_a_build_with_the_fallback_flags_is_found_before_any_compile_is_tried(monkeypatch, tmp_path):
    if sys.platform != "linux":
        pytest.skip("the native kernel is built on Linux only")
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path))
    built = kernels.build()
    monkeypatch.setattr(kernels, "FLAG_SETS", (["-no-such-flag"], *kernels.FLAG_SETS))  # would fail if compiled
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert kernels.build() == built and [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]


def rmsprop_pair(make, steps, params, grads, **settings):
    """Params after `steps` steps of the optimizer `make` on fixed gradients, and its state."""
    params = [p.clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = make(params, **settings)
    for _ in range(steps):
        optimizer.step()
    return params, optimizer


def zoo_tensors(seed=0):
    torch.manual_seed(seed)
    net = models.create_model("seed003").to(memory_format=torch.channels_last)  # conv weights channels_last
    params = [p.detach() for p in net.parameters()]
    return params, [torch.randn_like(p) * 1e-2 for p in params]


def test_native_rmsprop_follows_torchs_within_a_rounding_and_keeps_its_state(monkeypatch):
    assert kernels.library() is not None
    params, grads = zoo_tensors()
    calls = []
    step = kernels.library().rmsprop_step
    monkeypatch.setattr(kernels.library(), "rmsprop_step", lambda *a: calls.append(1) or step(*a))
    mine, native = rmsprop_pair(kernels.RMSprop, 20, params, grads, lr=1e-3, alpha=0.9, eps=1e-7)
    theirs, reference = rmsprop_pair(torch.optim.RMSprop, 20, params, grads, lr=1e-3, alpha=0.9, eps=1e-7)
    assert len(calls) == 20  # the native step ran, once per step for all tensors
    for a, b, p0 in zip(mine, theirs, params):
        assert a.stride() == b.stride()
        assert not torch.equal(a, p0)  # it moved: 20 steps of about lr each
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        sa, sb = native.state[a], reference.state[b]
        assert sa["step"].item() == sb["step"].item() == 20
        torch.testing.assert_close(sa["square_avg"], sb["square_avg"], rtol=1e-6, atol=0)
    # the state dicts are torch's: one's state loads into the other and goes on alike
    resumed = [p.clone() for p in theirs]
    for p, g in zip(resumed, grads):
        p.grad = g.clone()
    again = kernels.RMSprop(resumed, lr=1e-3, alpha=0.9, eps=1e-7)
    again.load_state_dict(copy.deepcopy(reference.state_dict()))
    again.step(), reference.step()
    assert len(calls) == 21 and again.state[resumed[0]]["step"].item() == 21
    for a, b in zip(resumed, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("settings", [{"momentum": 0.9}, {"centered": True}, {"weight_decay": 1e-4},
                                      {"maximize": True}, {"lr": torch.tensor(1e-3)}])
def test_rmsprop_settings_the_kernel_does_not_cover_run_torchs_own_step(settings, monkeypatch):
    params, grads = zoo_tensors(1)
    monkeypatch.setattr(kernels.library(), "rmsprop_step", lambda *a: pytest.fail("native step"))
    settings = {"lr": 1e-3, **settings}
    mine, _ = rmsprop_pair(kernels.RMSprop, 3, params, grads, **settings)
    theirs, _ = rmsprop_pair(torch.optim.RMSprop, 3, params, grads, **settings)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_rmsprop_with_a_gradient_laid_out_unlike_its_parameter_runs_torchs_step(monkeypatch):
    p = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 4, 3, 3)  # contiguous NCHW: an element-by-element pass would pair wrong elements
    monkeypatch.setattr(kernels.library(), "rmsprop_step", lambda *a: pytest.fail("native step"))
    mine, _ = rmsprop_pair(kernels.RMSprop, 2, [p], [g])
    theirs, _ = rmsprop_pair(torch.optim.RMSprop, 2, [p], [g])
    assert torch.equal(mine[0], theirs[0])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,k", [((16, 64, 5, 5), 3), ((32, 48, 4, 4), 3), ((8, 64, 4, 4), 4), ((4, 8, 5, 6), 3)])
def test_patch_matmul_conv_has_the_gradients_of_conv2d(shape, k, bias, monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 24, k, bias=bias).to(memory_format=torch.channels_last)
    fast = kernels.PatchMatmulConv(conv)
    x0 = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    calls, sums = [], []
    apply, col2im = kernels._PatchMatmulConv.apply, kernels.library().col2im
    monkeypatch.setattr(kernels._PatchMatmulConv, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(kernels.library(), "col2im", lambda *a: sums.append(1) or col2im(*a))
    results = []
    for layer in (conv, fast):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        g = torch.linspace(-1, 1, y.numel()).view_as(y)  # NCHW: the kernel lays it out itself
        y.backward(g)
        results.append((y.detach(), [x.grad, *(p.grad.clone() for p in conv.parameters())]))
    assert calls == [1] and sums == [1]  # the small output took the matmuls, and col2im summed the input gradient
    (y_a, grads_a), (y_b, grads_b) = results
    assert torch.equal(y_a, y_b)  # forward: oneDNN's own
    assert len(grads_a) == 2 + bias
    exact, magnitude = grads_f64(conv, x0, g), grads_f64(conv, x0, g, magnitudes=True)
    for a, b, e, m in zip(grads_a, grads_b, exact, magnitude):  # each within a rounding of the exact sum, as oneDNN's is
        assert ((a.double() - e).abs() <= 1e-6 * m).all() and ((b.double() - e).abs() <= 1e-6 * m).all()


def grads_f64(conv, x, dy, magnitudes: bool = False):
    """A convolution's input and parameter gradients in float64; with `magnitudes`, those of |x|, |dy| and
    |weight|: the sums of the terms' magnitudes, which bound what fp32 rounding moves a sum by (a few units
    of 6e-8 of it; the order of summation, hence the last bits, differs between CPUs)."""
    conv64 = copy.deepcopy(conv).double()
    if magnitudes:
        x, dy = x.abs(), dy.abs()
        conv64.weight.data.abs_()
    x64 = x.double().requires_grad_()
    conv64(x64).backward(dy.double())
    return [x64.grad, *(p.grad for p in conv64.parameters())]


def same_bits_on_any_number_of_threads(run):
    """run() on 1, 2 and 3 threads (the count restored after): asserts each gives the same tensors bit for
    bit, and returns the first's."""
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            result = run()
            results.append(result if isinstance(result, (tuple, list)) else (result,))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
    return results[0]


def output_f64(conv, x, magnitudes: bool = False):
    """A convolution's output in float64; with `magnitudes`, that of |x| and |weight| (see grads_f64)."""
    weight, bias = conv.weight.double(), conv.bias.double()
    if magnitudes:
        x, weight, bias = x.abs(), weight.abs(), bias.abs()
    return F.conv2d(x.double(), weight, bias)


def test_input_gradient_by_col2im_has_the_same_bits_with_any_number_of_threads_or_left_to_onednn():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(48, 64, 3).to(memory_format=torch.channels_last)
    x0 = torch.randn(64, 48, 4, 4).contiguous(memory_format=torch.channels_last)
    def input_grad(layer):
        x = x0.clone().requires_grad_()
        layer(x).square().sum().backward()
        return x.grad
    grad = same_bits_on_any_number_of_threads(lambda: input_grad(kernels.PatchMatmulConv(conv)))[0]
    assert torch.equal(input_grad(kernels.PatchMatmulConv(conv, col2im=False, winograd=False)), input_grad(conv))
    assert not torch.equal(grad, input_grad(conv))  # so the comparison above could fail
    assert kernels.col2im_input_grad(torch.float32, conv.weight)
    assert not kernels.col2im_input_grad(torch.bfloat16, conv.weight)  # bf16 autocast: oneDNN's, as before


def test_patch_matmul_conv_leaves_larger_outputs_and_other_convs_to_conv2d(monkeypatch):
    monkeypatch.setattr(kernels._PatchMatmulConv, "apply", lambda *a: pytest.fail("matmul path"))
    x = torch.randn(2, 32, 13, 13)  # 11x11 out: oneDNN's weight gradient is faster there than the matmul
    for conv in (torch.nn.Conv2d(32, 24, 3), torch.nn.Conv2d(32, 64, 5), torch.nn.Conv2d(32, 64, 3).double()):
        x = x.to(conv.weight.dtype)  # 24 outputs, 5x5, float64: not kernels.c's weight gradient
        assert torch.equal(kernels.PatchMatmulConv(conv)(x), conv(x))
    conv = torch.nn.Conv2d(32, 64, 3)  # kernels.c's, but not asked for, or no gradient wanted
    assert torch.equal(kernels.PatchMatmulConv(conv, native=False, winograd=False)(x.float()), conv(x.float()))
    with torch.no_grad():
        assert torch.equal(kernels.PatchMatmulConv(conv, winograd=False)(x.float()), conv(x.float()))
    assert kernels.patchable(conv) and kernels.patchable(torch.nn.Conv2d(8, 8, 4, padding="valid"))
    for other in (torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding="same"),
                  torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.Conv2d(8, 8, 3, dilation=2),
                  torch.nn.Conv2d(8, 8, 3, groups=2), torch.nn.Linear(8, 8)):
        assert not kernels.patchable(other)


@pytest.mark.parametrize("n,c_in,size,c_out", [(8, 64, 13, 64), (3, 1, 28, 32), (16, 4, 14, 32), (5, 32, 6, 48),
                                               (2, 3, 9, 64), (4, 128, 5, 128)])
def test_native_weight_gradient_is_the_exact_sum_within_fp32_rounding(n, c_in, size, c_out, monkeypatch):
    assert kernels.library() is not None
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 3).to(memory_format=torch.channels_last)
    assert kernels.native_weight_grad(torch.float32, conv.weight)
    calls, native = [], kernels.library().conv3_weight_grad
    monkeypatch.setattr(kernels.library(), "conv3_weight_grad", lambda *a: calls.append(1) or native(*a))
    x0 = torch.randn(n, c_in, size, size).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, c_out, size - 2, size - 2)
    results = []
    for layer in (conv, kernels.PatchMatmulConv(conv)):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
        results.append((y.detach(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    assert calls == [1]  # the native weight gradient ran, once
    (y_a, gx_a, gw_a, gb_a), (y_b, gx_b, gw_b, gb_b) = results
    assert gw_b.stride() == conv.weight.stride()  # laid out as the weight: the native RMSprop takes it
    exact, magnitude = grads_f64(conv, x0, g), grads_f64(conv, x0, g, magnitudes=True)
    for mine, e, m in zip((y_b, gx_b, gw_b, gb_b), [output_f64(conv, x0), *exact],
                          [output_f64(conv, x0, magnitudes=True), *magnitude]):
        assert ((mine.double() - e).abs() <= 1e-6 * m).all()
    assert not ((gw_b.double() * (1 + 1e-4) - exact[1]).abs() <= 1e-6 * magnitude[1]).all()  # the bound can fail


def test_frozen_weights_get_the_input_gradient_alone(monkeypatch):
    monkeypatch.setattr(kernels.library(), "conv3_weight_grad", lambda *a: pytest.fail("a weight gradient"))
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last).requires_grad_(False)
    x0 = torch.randn(4, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    grads = []
    for layer in (conv, kernels.PatchMatmulConv(conv)):
        x = x0.clone().requires_grad_()
        layer(x).square().sum().backward()
        grads.append(x.grad)
    assert torch.allclose(*grads, atol=1e-5) and conv.weight.grad is None and conv.bias.grad is None


def test_a_native_weight_gradient_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    monkeypatch.setattr(kernels.library(), "conv3_weight_grad", lambda *a: -1)  # its malloc failed
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    y = kernels.PatchMatmulConv(conv)(torch.randn(2, 32, 13, 13).contiguous(memory_format=torch.channels_last))
    with pytest.raises(MnistlabError, match="out of memory for a weight gradient's sums; .*--batch-size"):
        y.sum().backward()


def test_native_weight_gradient_has_the_same_bits_with_any_number_of_threads():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    layer = kernels.PatchMatmulConv(conv)
    x = torch.randn(16, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    def weight_grad():
        conv.zero_grad()
        layer(x).square().sum().backward()
        return conv.weight.grad.clone()
    same_bits_on_any_number_of_threads(weight_grad)


@pytest.mark.parametrize("tile", [2, 3])
@pytest.mark.parametrize("n,c_in,h,w,c_out", [(8, 32, 13, 13, 64), (3, 16, 9, 6, 16), (1, 8, 7, 7, 32),
                                               (2, 48, 8, 7, 16), (2, 128, 7, 7, 128), (16, 64, 5, 6, 64)])
def test_winograd_convolution_and_its_input_gradient_are_the_exact_sums_within_fp32_rounding(n, c_in, h, w, c_out,
                                                                                             tile, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "winograd_tile", lambda h, w: tile)  # F(2x2, 3x3) or F(3x3, 3x3) forward
    conv = torch.nn.Conv2d(c_in, c_out, 3).to(memory_format=torch.channels_last)
    assert kernels.winograd(torch.float32, conv.weight)
    calls = []
    for name in ("winograd3", "winograd3_input_grad"):
        native = getattr(kernels.library(), name)
        monkeypatch.setattr(kernels.library(), name, lambda *a, name=name, native=native: calls.append(name) or native(*a))
    x0 = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, c_out, h - 2, w - 2)
    x = x0.clone().requires_grad_()
    y = kernels.PatchMatmulConv(conv)(x)
    y.backward(g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    by_winograd = c_in % 16 == 0  # the input gradient swaps the channels: 16 x c_in outputs, c_out a multiple of 8
    assert calls == ["winograd3"] + ["winograd3_input_grad"] * by_winograd
    exact, magnitude = output_f64(conv, x0), output_f64(conv, x0, magnitudes=True)
    bound = 1e-6 if tile == 2 else 2e-6  # 16 or 33 units of fp32 rounding; F(3x3)'s transforms weigh by up to 4 and 1/6
    assert ((y.double() - exact).abs() <= bound * magnitude).all()
    assert not ((y.double() * (1 + 1e-4) - exact).abs() <= bound * magnitude).all()  # the bound can fail
    exact, magnitude = grads_f64(conv, x0, g)[0], grads_f64(conv, x0, g, magnitudes=True)[0]
    assert ((x.grad.double() - exact).abs() <= 1e-6 * magnitude).all()


def test_winograd_has_the_same_bits_with_any_number_of_threads_and_is_left_out_where_it_does_not_apply(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    x0 = torch.randn(5, 32, 13, 11).contiguous(memory_format=torch.channels_last)
    def output_and_input_grad(layer):
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), x.grad
    y, _ = same_bits_on_any_number_of_threads(lambda: output_and_input_grad(kernels.PatchMatmulConv(conv)))
    assert not torch.equal(y, conv(x0))  # Winograd's, not oneDNN's: the comparison above could fail
    with torch.no_grad():  # evaluation takes it too
        assert torch.equal(kernels.PatchMatmulConv(conv)(x0), y)
    assert not kernels.winograd(torch.bfloat16, conv.weight)  # bf16 autocast: oneDNN's
    for other in (torch.nn.Conv2d(4, 64, 3), torch.nn.Conv2d(32, 24, 3), torch.nn.Conv2d(32, 64, 5)):
        assert not kernels.winograd(torch.float32, other.weight)
    calls = []
    for name in ("winograd3", "winograd3_input_grad", "col2im"):
        native = getattr(kernels.library(), name)
        monkeypatch.setattr(kernels.library(), name, lambda *a, name=name, native=native: calls.append(name) or native(*a))
    kernels.PatchMatmulConv(conv)(torch.randn(2, 32, 5, 5, requires_grad=True)).sum().backward()
    assert calls == ["winograd3", "col2im"]  # 3x3 out: Winograd's forward, the matmul and col2im's input gradient
    kernels.PatchMatmulConv(conv)(torch.randn(2, 32, 6, 6, requires_grad=True)).sum().backward()
    assert calls[2:] == ["winograd3", "winograd3_input_grad"]  # 4x4 out: Winograd's both ways
    one = x0[:1, :, :5, :5]  # one image, a 3x3 output: 4 tiles
    kernels.PatchMatmulConv(conv)(one.clone().requires_grad_()).sum().backward()
    assert calls[4:] == ["col2im"]  # a training step: not worth the weights' transform, oneDNN's forward
    with torch.no_grad():  # evaluation keeps the transform from call to call: Winograd's
        y = kernels.PatchMatmulConv(conv)(one)
        assert calls[5:] == ["winograd3"] and ((y - conv(one)).norm() <= 1e-5 * conv(one).norm()).item()


def test_winograd_weight_transform_is_g_w_g_transposed_for_either_layout_and_orientation():
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    g5 = torch.tensor([[1 / 2, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 6, -1 / 6, 1 / 6], [1 / 6, 1 / 3, 2 / 3], [0, 0, 1]],
                      dtype=torch.float64)  # F(3x3, 3x3)'s
    weight = torch.randn(48, 24, 3, 3)
    exact = torch.einsum("ar,oirs,bs->abio", g, weight.double(), g).reshape(16, 24, 48)
    exact5 = torch.einsum("ar,oirs,bs->abio", g5, weight.double(), g5).reshape(25, 24, 48)
    for layout in (weight, weight.contiguous(memory_format=torch.channels_last)):
        assert torch.allclose(kernels.winograd_transform(layout).double(), exact, rtol=0, atol=1e-6)
        assert torch.allclose(kernels.winograd_transform(layout, transposed=True).double(), exact.transpose(1, 2),
                              rtol=0, atol=1e-6)
        assert torch.allclose(kernels.winograd_transform(layout, tile=3).double(), exact5, rtol=0, atol=1e-6)


def test_winograd_takes_3x3_tiles_where_they_need_at_most_three_quarters_of_the_products():
    # (output side, tile): 3x3 tiles for seed003's 3x3 output, 11x11 and the 24x24 ones; 2x2 for 10x10, 8x8, 4x4, 2x2
    for side, tile in ((3, 3), (11, 3), (24, 3), (10, 2), (8, 2), (4, 2), (2, 2), (1, 2)):
        assert kernels.winograd_tile(side, side) == tile, side
    conv = torch.nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        by3, by2 = kernels.winograd_conv(x, conv.weight, conv.bias), kernels.PatchMatmulConv(conv)(x)
        assert torch.equal(by3, by2)  # the module takes the 3x3 tiles too
        by2 = kernels.winograd_conv(x, conv.weight, conv.bias, kernels.MaxPoolReLU(False))[0]  # pooled: 2x2 tiles
        assert torch.allclose(by2, F.max_pool2d(by3, 2), rtol=0, atol=1e-5) and not torch.equal(by2, F.max_pool2d(by3, 2))


def test_a_winograd_convolution_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 13, 13).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = kernels.PatchMatmulConv(conv)(x)
    monkeypatch.setattr(kernels.library(), "winograd3_input_grad", lambda *a: -1)  # its malloc failed
    with pytest.raises(MnistlabError, match="out of memory for a Winograd input gradient's buffers; .*--batch-size"):
        y.sum().backward()
    monkeypatch.setattr(kernels.library(), "winograd3", lambda *a: -1)
    with pytest.raises(MnistlabError, match="out of memory for a Winograd convolution's buffers; .*--batch-size"):
        kernels.PatchMatmulConv(conv)(x)


def winograd_then_pool(conv, pool, x):
    """The fused module's reference: the PatchMatmulConv (Winograd, F(2x2, 3x3) as the test sets) and the
    MaxPoolReLU, one after the other."""
    return pool(kernels.PatchMatmulConv(conv)(x))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,c_in,h,w,c_out", [(8, 32, 13, 13, 64), (3, 16, 12, 9, 16), (5, 8, 4, 5, 32),
                                              (5, 64, 13, 13, 128)])
def test_winograd_pool_relu_is_winograd_then_the_pooling_bit_for_bit_with_their_gradients(n, c_in, h, w, c_out, bias,
                                                                                          relu, monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 3, bias=bias).to(memory_format=torch.channels_last)
    pool = kernels.MaxPoolReLU(relu)
    fused = kernels.WinogradPoolReLU(kernels.PatchMatmulConv(conv), pool, tile=2)  # F(4x4, 3x3): the test below
    x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    x[0, :, 1, 1] = float("nan")  # a NaN wins its pooling window, as in torch's max_pool2d
    x[-1, :, :, :] = -x[-1].abs() if bias else x[-1]
    calls = []
    winograd3 = kernels.library().winograd3
    monkeypatch.setattr(kernels.library(), "winograd3", lambda *a: calls.append(a[10] & 1 == 1) or winograd3(*a))
    monkeypatch.setattr(kernels, "winograd_tile", lambda h, w: 2)  # the pooled pass's tiles, for the reference too
    results = []
    for way in (lambda x: fused(x), lambda x: winograd_then_pool(conv, pool, x)):
        conv.zero_grad()
        x_ = x.clone().requires_grad_()
        y = way(x_)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
        y.backward(g)
        results.append([y, x_.grad.nan_to_num(), conv.weight.grad.nan_to_num()]
                       + ([conv.bias.grad.nan_to_num()] if bias else []))
    assert calls == [True, False]  # one pooled pass, then the plain convolution of the reference
    (y, *grads), (y_ref, *grads_ref) = results
    assert y.shape == (n, c_out, (h - 2) // 2, (w - 2) // 2) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any() and torch.equal(y.nan_to_num(), y_ref.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    if relu:
        assert (y.nan_to_num() >= 0).all() and (y == 0).any()
    # and the convolution it pools is torch's to a rounding
    reference = conv_pool_reference(conv, x.nan_to_num(), relu)
    assert ((fused(x.nan_to_num()) - reference).abs().max() <= 1e-4 * reference.abs().max()).item()


@pytest.mark.parametrize("n,c_in,h,w,c_out", [(8, 32, 13, 13, 64), (3, 16, 12, 9, 16), (2, 8, 14, 11, 32),
                                              (5, 8, 4, 5, 32), (4, 64, 10, 13, 128), (37, 16, 13, 13, 32)])
def test_winograd_pool_relu_by_4x4_tiles_is_the_exact_pooled_sums_within_fp32_rounding(n, c_in, h, w, c_out):
    # (h - 2) // 2 * 2 rows and columns pooled: 4x4 tiles, with 2-wide ones at the edges where 4 does not divide
    # it; taken in blocks of 12 images (37: three and a part)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 3).to(memory_format=torch.channels_last)
    x = torch.randn(n, c_in, h, w).contiguous(memory_format=torch.channels_last)
    fused = kernels.WinogradPoolReLU(kernels.PatchMatmulConv(conv), kernels.MaxPoolReLU(False))
    assert kernels.POOLED_TILE == 4
    with torch.no_grad():
        y, by2 = fused(x), kernels.winograd_conv(x, conv.weight, conv.bias, fused.pool, tile=2)[0]
    exact, magnitude = output_f64(conv, x), output_f64(conv, x, magnitudes=True)
    exact, magnitude = F.max_pool2d(exact, 2), F.max_pool2d(magnitude, 2)  # a maximum moves by at most the worst error
    bound = 4e-6  # 67 units of fp32 rounding; F(4, 3)'s transforms weigh by up to 8 and 1/24 (27-30 seen)
    assert y.shape == exact.shape and ((y.double() - exact).abs() <= bound * magnitude).all()
    assert not ((y.double() * (1 + 1e-4) - exact).abs() <= bound * magnitude).all()  # the bound can fail
    assert torch.equal(y, by2) == (min(h, w) < 6)  # another rounding than F(2x2)'s, unless no 4x4 tile fits
    grads = []
    for tile in (None, 2):  # the gradients: the pooling's (by its winning positions), then the convolution's
        fused.tile = tile
        conv.zero_grad()
        xg = x.clone().requires_grad_()
        fused(xg).square().sum().backward()
        grads.append((xg.grad, conv.weight.grad.clone()))
    wins = [kernels.winograd_conv(x, conv.weight, conv.bias, fused.pool, tile=t)[1] for t in (4, 2)]
    assert (wins[0] == wins[1]).float().mean() > 0.999  # the same winners but for near ties
    for a, b in zip(*grads):
        assert ((a - b).norm() <= 1e-3 * b.norm()).item()


def test_winograd_pool_relu_has_the_same_bits_with_any_number_of_threads_and_leaves_other_cases_to_the_two(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    fused = kernels.WinogradPoolReLU(kernels.PatchMatmulConv(conv), kernels.MaxPoolReLU(True))
    x = torch.randn(37, 32, 13, 13).contiguous(memory_format=torch.channels_last)

    def step():
        conv.zero_grad()
        x_ = x.clone().requires_grad_()
        y = fused(x_)
        y.square().sum().backward()
        return y.detach(), x_.grad, conv.weight.grad.clone()
    same_bits_on_any_number_of_threads(step)
    calls = []
    winograd3 = kernels.library().winograd3
    monkeypatch.setattr(kernels.library(), "winograd3", lambda *a: calls.append(a[10] & 1 == 1) or winograd3(*a))
    with torch.autocast("cpu", torch.bfloat16):  # bf16: oneDNN's convolution, then the pooling
        assert fused(x).dtype == torch.bfloat16
    fused(x[:, :, :3, :3])  # a 1x1 output: no pooling window, the two modules
    assert calls == [False]
    fused(x)
    assert calls == [False, True]


def test_a_winograd_pool_relu_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(kernels.library(), "winograd3", lambda *a: -1)
    with pytest.raises(MnistlabError, match="out of memory for a Winograd convolution's buffers; .*--batch-size"):
        kernels.WinogradPoolReLU(kernels.PatchMatmulConv(conv), kernels.MaxPoolReLU(True))(x)


def conv_pool_reference(conv, x, relu):
    y = F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2)
    return F.relu(y) if relu else y


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,c,size,k", [(64, 32, 28, 3), (5, 64, 28, 3), (3, 16, 27, 5), (2, 48, 5, 3)])
def test_conv_pool_relu_is_the_convolution_pooling_and_relu_with_their_gradients(n, c, size, k, bias, relu,
                                                                                 monkeypatch):
    assert kernels.library() is not None
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, c, k, bias=bias)
    layer = kernels.ConvPoolReLU(conv, kernels.MaxPoolReLU(relu))
    x = torch.rand(n, 1, size, size)
    x[0, 0, :6] = 0  # a flat background: ties between the window's positions
    g = torch.randn(n, c, (size - k + 1) // 2, (size - k + 1) // 2)
    calls, apply = [], kernels._ConvPoolReLU.apply
    monkeypatch.setattr(kernels._ConvPoolReLU, "apply", lambda *a: calls.append(1) or apply(*a))
    grads = []
    for run in (layer, lambda x: conv_pool_reference(conv, x, relu)):
        conv.zero_grad()
        y = run(x)
        y.backward(g)
        grads.append((y.detach(), conv.weight.grad.clone(), conv.bias.grad.clone() if bias else None))
    (y, gw, gb), (y_ref, gw_ref, gb_ref) = grads
    assert calls == [1]  # the kernel ran, once
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert (y - y_ref).abs().max().item() < 1e-5 and ((gw - gw_ref).norm() / gw_ref.norm()).item() < 1e-5
    assert not bias or ((gb - gb_ref).norm() / gb_ref.norm()).item() < 1e-5
    assert gw.stride() == conv.weight.stride()  # laid out as the weight: the native RMSprop takes it
    with torch.autocast("cpu", torch.bfloat16):  # fp32 arithmetic, rounded once to bf16
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16 and ((y16.float() - y_ref).abs() <= y_ref.abs() * 2 ** -8 + 1e-6).all()
    forwards, forward = [], kernels.conv_pool_forward
    monkeypatch.setattr(kernels, "conv_pool_forward", lambda *a, **kw: forwards.append(kw) or forward(*a, **kw))
    with torch.inference_mode():  # evaluation: the forward alone, the same numbers as in training
        y_eval = layer(x)
        with torch.autocast("cpu", torch.bfloat16):
            y16_eval = layer(x)
    assert forwards == [{"won": False}] * 2 and calls == [1, 1]  # the native forward ran, outside the autograd
    # function, keeping no winning positions (nothing to backpropagate)
    assert torch.equal(y_eval, y) and torch.equal(y16_eval, y16)
    assert y_eval.is_contiguous(memory_format=torch.channels_last)


def test_conv_pool_relu_weight_gradient_has_the_same_bits_with_any_number_of_threads():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 32, 3)
    layer = kernels.ConvPoolReLU(conv, kernels.MaxPoolReLU(True))
    x = torch.rand(64, 1, 28, 28)
    def grads():
        conv.zero_grad()
        layer(x).float().square().sum().backward()
        return conv.weight.grad.clone(), conv.bias.grad.clone()
    same_bits_on_any_number_of_threads(grads)


def test_conv_pool_relu_leaves_input_gradients_and_other_shapes_to_torch(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 32, 3)
    layer = kernels.ConvPoolReLU(conv, kernels.MaxPoolReLU(True))
    x = torch.rand(4, 1, 28, 28)

    def not_native(*args):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(kernels, "conv_pool_forward", not_native)
    expected = conv_pool_reference(conv, x, True)
    assert torch.equal(layer(x.clone().requires_grad_()).detach(), expected)  # it computes no input gradient
    conv.double()
    assert torch.equal(layer(x.double()).detach(), conv_pool_reference(conv, x.double(), True).detach())
    conv.float()
    for other in (torch.nn.Conv2d(1, 24, 3), torch.nn.Conv2d(1, 32, 4)):  # shapes the kernel has no code for
        built = kernels.ConvPoolReLU(other, kernels.MaxPoolReLU(True))
        assert torch.equal(built(x).detach(), conv_pool_reference(other, x, True).detach())
    monkeypatch.setattr(kernels, "library", lambda: None)
    assert torch.equal(layer(x).detach(), expected)
    assert kernels.conv_poolable(torch.nn.Conv2d(1, 32, 3)) and kernels.conv_poolable(torch.nn.Conv2d(1, 64, 5))
    for other in (torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(1, 24, 3), torch.nn.Conv2d(1, 32, 3, padding="same"),
                  torch.nn.Conv2d(1, 32, 3, stride=2), torch.nn.Conv2d(1, 32, 4), torch.nn.Conv2d(1, 32, 3, dilation=2)):
        assert not kernels.conv_poolable(other)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,c,size", [(64, 32, 28), (3, 16, 14), (5, 48, 30)])
def test_conv_pool_relu_after_space_to_depth_is_the_three_layers_with_their_gradients(n, c, size, bias, relu,
                                                                                      monkeypatch):
    """fast's first layers: SpaceToDepth(2), a 3x3 convolution of the 4 channels, the pooling."""
    torch.manual_seed(0)
    s2d, conv = torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(4, c, 3, bias=bias).to(memory_format=torch.channels_last)
    layer = kernels.ConvPoolReLU(conv, kernels.MaxPoolReLU(relu), s2d)
    x = torch.rand(n, 1, size, size)
    x[0, 0, :8] = 0  # a flat background: ties between the window's positions
    calls, apply = [], kernels._ConvPoolReLU.apply
    monkeypatch.setattr(kernels._ConvPoolReLU, "apply", lambda *a: calls.append(1) or apply(*a))
    y = layer(x)
    g = torch.randn(y.shape)
    y.backward(g)
    assert calls == [1]  # the kernel ran, once
    y_ref = conv_pool_reference(conv, s2d(x), relu)
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert (y - y_ref).abs().max().item() < 1e-5
    # the weight and bias gradients: the convolution's, given the pooling's choices (where a near tie is
    # rounded differently by oneDNN, the kernel's), within a rounding of the float64 sums
    won = kernels.conv_pool_forward(x, conv.weight, conv.bias, relu, torch.float32, 2)[1].permute(0, 3, 1, 2)
    grad = torch.stack([torch.where(won == q, g, 0) for q in range(4)], -1).view(*g.shape, 2, 2)
    grad = grad.permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * g.shape[2], 2 * g.shape[3])  # [.., i, j, qi, qj]
    grad = F.pad(grad, (0, (size // 2 - 2) % 2, 0, (size // 2 - 2) % 2))  # an odd row and column: no gradient
    exact, magnitude = grads_f64(conv, s2d(x), grad), grads_f64(conv, s2d(x), grad, magnitudes=True)
    for mine, e, m in zip([p.grad for p in conv.parameters()], exact[1:], magnitude[1:]):
        assert ((mine.double() - e).abs() <= 1e-6 * m + 1e-12).all()
    with torch.inference_mode():  # evaluation: the forward alone, the same numbers as in training
        assert torch.equal(layer(x), y.detach())
    with torch.autocast("cpu", torch.bfloat16):  # bf16 autocast: torch's layers (the blocks' kernel is fp32 only)
        assert torch.equal(layer(x), conv_pool_reference(conv, s2d(x), relu))
    assert calls == [1]
    assert kernels.conv_poolable(conv, s2d)
    for conv_, s2d_ in ((torch.nn.Conv2d(4, 32, 5), s2d), (torch.nn.Conv2d(4, 24, 3), s2d),
                        (torch.nn.Conv2d(9, 32, 3), torch.nn.PixelUnshuffle(3)), (torch.nn.Conv2d(4, 32, 3), torch.nn.ReLU())):
        assert not kernels.conv_poolable(conv_, s2d_)


@pytest.mark.parametrize("n", [32, 26, 25])
def test_conv_pool_relu_gradient_over_a_batch_is_the_sum_of_its_halves_bit_for_bit(n):
    """What two processes of a data-parallel job compute (each its half, then the mean: an exact halving)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 32, 3)
    layer = kernels.ConvPoolReLU(conv, kernels.MaxPoolReLU(True))
    x, g = torch.rand(n, 1, 28, 28), torch.randn(n, 32, 13, 13)

    def grads(part):
        conv.zero_grad()
        layer(x[part]).backward(g[part])
        return conv.weight.grad.clone(), conv.bias.grad.clone()
    whole, first, second = grads(slice(None)), grads(slice(0, n // 2)), grads(slice(n // 2, n))
    assert all(torch.equal(a, b + c) for a, b, c in zip(whole, first, second))


def batchnorm(shape, momentum=0.01):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(shape[1], eps=1e-3, momentum=momentum) if len(shape) == 4 else torch.nn.BatchNorm1d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(shape) * 3 + 1  # an offset: the sum of squares must not cancel
    return bn, x.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else x


def through(layer, bn, x0, g):
    x = x0.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return [y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(), bn.running_var.clone()]


@pytest.mark.parametrize("relu_first", [False, True])
@pytest.mark.parametrize("shape,momentum", [((64, 32, 6, 6), 0.01), ((7, 48, 5, 3), 0.1), ((33, 64), None),
                                            ((5, 16, 1, 2), 0.01)])
def test_batchnorm_relu_is_torchs_batchnorm_and_relu_to_a_rounding(shape, momentum, relu_first, monkeypatch):
    bn, x0 = batchnorm(shape, momentum)
    ref64 = copy.deepcopy(bn).double()
    g = torch.randn(shape)
    calls, apply = [], kernels._BatchNormReLU.apply
    monkeypatch.setattr(kernels._BatchNormReLU, "apply", lambda *a: calls.append(1) or apply(*a))
    mine = through(kernels.BatchNormReLU(bn, relu_first), bn, x0, g)
    relu_bn = (lambda x: ref64(F.relu(x))) if relu_first else (lambda x: F.relu(ref64(x)))
    exact = through(relu_bn, ref64, x0.double(), g.double())
    assert calls == [1] and int(bn.num_batches_tracked) == 1
    assert mine[0].stride() == mine[1].stride() == x0.stride()  # laid out as the input
    for a, e in zip(mine, exact):  # output, input, weight and bias gradients, running mean and variance
        assert ((a.double() - e).abs() <= 4e-6 * e.abs().max() + 1e-7).all()  # torch fp32: up to 2.6e-6
    wrong = exact[1].clone()
    wrong[(0,) * wrong.dim()] += 1e-4 * wrong.abs().max()
    assert not ((mine[1].double() - wrong).abs() <= 4e-6 * wrong.abs().max() + 1e-7).all()  # the bound can fail


def test_batchnorm_relu_has_the_same_bits_with_any_number_of_threads():
    bn, x0 = batchnorm((128, 32, 12, 12))
    g = torch.randn(x0.shape)
    def results():
        layer = kernels.BatchNormReLU(copy.deepcopy(bn))
        return through(layer, layer.bn, x0, g)
    same_bits_on_any_number_of_threads(results)


def test_batchnorm_relu_passes_nan_and_leaves_other_cases_to_torch(monkeypatch):
    bn, x = batchnorm((8, 16, 4, 4))
    layer = kernels.BatchNormReLU(bn)
    x[0, 0, 0, 0] = float("nan")
    assert layer(x).isnan().all(dim=(0, 2, 3))[0]  # NaN in a channel's statistics: all of it NaN, as torch's
    monkeypatch.setattr(kernels._BatchNormReLU, "apply", lambda *a: pytest.fail("the kernel ran"))
    bn, x = batchnorm((8, 16, 4, 4))
    expected = F.relu(copy.deepcopy(bn)(x.contiguous()))
    assert torch.equal(layer(x.contiguous()), expected)  # NCHW: torch's
    layer.bn = bn
    bn.eval()
    assert torch.equal(layer(x), F.relu(bn(x)))  # evaluation: torch's
    bn.train()
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # bf16 (autocast's convolutions): torch's
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 16, 1, 1).contiguous(memory_format=torch.channels_last))  # torch's own error


def test_batchnorm_relu_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    monkeypatch.setattr(kernels.library(), "batchnorm_relu_forward", lambda *a: -1)  # its malloc failed
    bn, x = batchnorm((8, 16, 4, 4))
    with pytest.raises(MnistlabError, match="out of memory for a batch normalisation's sums; .*--batch-size"):
        kernels.BatchNormReLU(bn)(x)


def test_a_first_layer_weight_gradient_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    monkeypatch.setattr(kernels.library(), "conv_pool_backward", lambda *a: -1)  # its malloc failed
    layer = kernels.ConvPoolReLU(torch.nn.Conv2d(1, 32, 3), kernels.MaxPoolReLU(True))
    y = layer(torch.rand(4, 1, 28, 28))
    with pytest.raises(MnistlabError, match="out of memory for a first layer's weight gradient; .*--batch-size"):
        y.sum().backward()


def test_evaluation_keeps_the_weights_transform_until_the_weight_changes(monkeypatch):
    torch.manual_seed(0)
    conv2, conv3 = (torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last) for _ in range(2))
    pooled = kernels.WinogradPoolReLU(kernels.PatchMatmulConv(conv2), kernels.MaxPoolReLU(True))
    plain = kernels.PatchMatmulConv(conv3)
    x = torch.randn(8, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    calls = []
    transform = kernels.winograd_transform
    monkeypatch.setattr(kernels, "winograd_transform", lambda *a, **kw: calls.append(kw.get("tile")) or transform(*a, **kw))
    with torch.no_grad():
        first = [pooled(x), plain(x)]
        again = [pooled(x), plain(x)]
        assert calls == [4, 3] and all(torch.equal(a, b) for a, b in zip(first, again))  # made once (F(4x4) pooled, F(3x3) for 11x11), then kept
        for conv in (conv2, conv3):
            conv.weight.mul_(2)  # changed in place (an optimizer step, load_state_dict): made again
        changed = [pooled(x), plain(x)]
        assert calls == [4, 3, 4, 3] and all(not torch.equal(a, b) for a, b in zip(first, changed))
        conv3.weight = torch.nn.Parameter(conv3.weight.detach().clone())  # another tensor: made again
        plain(x)
        assert calls[4:] == [3]
    plain(x.requires_grad_()).sum().backward()  # training makes it each step, as the weights change
    assert calls[5:] == [3, None]  # the forward's, then the input gradient's (transposed, F(2x2))


def test_evaluation_reads_only_fp32_parameters_as_they_are():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3).double().to(memory_format=torch.channels_last)  # fp64 weights, fp32 input
    x = torch.randn(4, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # cast to fp32 as a training step does, not read as fp32 bits
        y, reference = kernels.PatchMatmulConv(conv)(x), conv(x.double())
    assert y.dtype == torch.float32 and ((y - reference).norm() <= 1e-5 * reference.norm()).item()


def test_a_relu_after_a_winograd_convolution_is_done_in_its_pass_in_evaluation(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    with_relu, alone = kernels.PatchMatmulConv(conv, relu=True), kernels.PatchMatmulConv(conv)
    x = torch.randn(6, 32, 13, 13).contiguous(memory_format=torch.channels_last)
    x[0, :, 4, 4] = float("nan")  # a NaN passes the ReLU, as torch's
    modes = []
    winograd3 = kernels.library().winograd3
    monkeypatch.setattr(kernels.library(), "winograd3", lambda *a: modes.append(a[10]) or winograd3(*a))
    with torch.no_grad():
        y, reference = with_relu(x), F.relu(alone(x))
    assert modes == [2, 0]  # the ReLU in the pass; the plain convolution
    assert torch.equal(y.isnan(), reference.isnan()) and y.isnan().any() and (y.nan_to_num() >= 0).all()
    assert torch.equal(y.nan_to_num(), reference.nan_to_num()) and (y == 0).any()
    xg = x.nan_to_num().requires_grad_()  # training: the convolution, then torch's ReLU (its gradient)
    trained = with_relu(xg)
    trained.square().sum().backward()
    assert torch.equal(trained.detach(), F.relu(alone(x.nan_to_num())).detach())
    assert modes[2:] == [0, 0] and xg.grad.abs().sum() > 0
    fast = models.fused(models.create_model("seed003").eval())
    assert [type(m).__name__ for m in fast][2:4] == ["PatchMatmulConv", "FlattenLinear"] and fast[2].relu


def layer_by_layer(net, x):
    for layer in net:
        x = layer(x)
    return x


def counting_chain_calls(monkeypatch):
    """kernels.c's chain_forward, spied on: the list it appends each call's number of Winograd layers to"""
    calls, chain = [], kernels.library().chain_forward
    monkeypatch.setattr(kernels.library(), "chain_forward", lambda *a: calls.append(a[11]) or chain(*a))
    return calls


@pytest.mark.parametrize("name,n,winograd_layers", [("seed003", 29, 2), ("seed003", 1, 2), ("seed004", 13, 1)])
def test_evaluation_runs_the_first_layers_as_one_call_with_the_same_bits_as_layer_by_layer(name, n, winograd_layers,
                                                                                          monkeypatch):
    torch.manual_seed(0)
    net = models.fused(models.create_model(name).eval())
    x = torch.rand(n, 1, 28, 28)
    x[0, 0, 9, 3:8] = float("nan")  # spreads through the layers as it does one by one
    calls = counting_chain_calls(monkeypatch)
    monkeypatch.setattr(kernels, "CHAIN_MIN_IMAGES", 1)  # small batches: the layers one by one (below)
    with torch.inference_mode():
        same_bits_on_any_number_of_threads(lambda: net(x).nan_to_num())  # blocks taken as threads come free
        y, reference = net(x), layer_by_layer(net, x)
    # seed004's Dropout ends its chain
    assert calls == [winograd_layers] * 4
    assert torch.equal(y.isnan(), reference.isnan()) and y[0].isnan().all() and not y[1:].isnan().any()
    assert torch.equal(y.nan_to_num(), reference.nan_to_num())


def test_a_chain_takes_5x5_first_layers_plain_winograd_layers_and_no_bias_and_only_evaluation(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 5, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(16, 32, 3),  # 12x12 -> 10x10, no ReLU
                              torch.nn.Conv2d(32, 16, 3, bias=False), torch.nn.ReLU(),  # -> 8x8
                              torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10)).to(memory_format=torch.channels_last)
    fast = models.fused(net)
    x = torch.randn(kernels.CHAIN_MIN_IMAGES + 5, 1, 28, 28)
    calls = counting_chain_calls(monkeypatch)
    with torch.inference_mode():
        fast(x[:kernels.CHAIN_MIN_IMAGES - 1])  # fits the caches as it is: the layers one by one, on all threads
        assert calls == []
        y, reference = fast(x), layer_by_layer(fast, x)
    assert calls == [2] and torch.equal(y, reference)
    assert (y - net(x)).abs().max() <= 1e-4 * net(x).abs().max()  # the model as written, to a rounding
    fast(x.requires_grad_()).sum().backward()  # training: layer by layer, through the autograd functions
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):  # bf16: oneDNN's convolutions
        fast(x)
    assert calls == [2] and net[0].weight.grad.abs().sum() > 0


def test_a_chain_that_cannot_allocate_says_so_in_one_line(monkeypatch):
    from mnistlab.errors import MnistlabError
    net = models.fused(models.create_model("seed003").eval())
    monkeypatch.setattr(kernels.library(), "chain_forward", lambda *a: -1)
    with torch.inference_mode(), pytest.raises(MnistlabError, match="out of memory for the first layers' buffers; .*--batch-size"):
        net(torch.rand(kernels.CHAIN_MIN_IMAGES, 1, 28, 28))
