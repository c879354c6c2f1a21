"""export: ONNX and TorchScript files that compute what PyTorch computes, and the ONNX engine of predict."""
import json
import sys

import numpy as np
import onnx
import pytest
import torch

import mnistlab
from mnistlab import export, models
from mnistlab.cli import main
from mnistlab.errors import MnistlabError


def make_run(tmp_path, name: str):
    torch.manual_seed(0)
    net = models.create_model(name)
    net.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode export really is tested
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
    run = tmp_path / name
    models.save_model(net, models.Architecture(name, {}, 10, list("0123456789"), "mnist"), run)
    return run


def reference_logits(run, images: torch.Tensor) -> np.ndarray:
    net, _ = models.load_model(run)
    with torch.inference_mode():
        return net(images).numpy()


@pytest.mark.parametrize("name", ["seed003", "seed000"])  # seed000: BatchNorm and Dropout in eval mode
def test_onnx_export_equals_pytorch_for_any_batch_size(name, tmp_path):
    run = make_run(tmp_path, name)
    result = export.export(run, "onnx")
    assert result.path == run / "model.onnx" and result.max_abs_diff <= 1e-4
    proto = onnx.load(str(result.path))
    batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # a named, dynamic batch axis
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["classes"]) == list("0123456789") and metadata["dataset"] == "mnist"
    runner = export.onnx_runner(result.path)
    for batch in (1, 37):
        images = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        logits = runner(images)
        assert logits.shape == (batch, 10)
        diff = np.abs(logits - reference_logits(run, images)).max()
        print(f"\n{name} ONNX batch {batch}: max abs diff {diff:.2e}")
        assert diff <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_equals_pytorch(tmp_path):
    run = make_run(tmp_path, "seed000")
    out = tmp_path / "elsewhere" / "net.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    loaded = torch.jit.load(str(out))  # TorchScript is code: load only files you trust (this one we wrote)
    for batch in (1, 37):
        images = torch.rand(batch, 1, 28, 28)
        with torch.inference_mode():
            assert np.allclose(loaded(images).numpy(), reference_logits(run, images), atol=1e-6, rtol=0)


def test_predict_engine_onnx_gives_pytorchs_probabilities(tmp_path, capsys):
    run = make_run(tmp_path, "seed003")
    digits = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch_probabilities = mnistlab.load(run).predict(digits, prepare=False)
    onnx_model = mnistlab.load(run, engine="onnx")  # no model.onnx yet: exported in memory, nothing written
    assert not (run / "model.onnx").exists()
    assert np.abs(onnx_model.predict(digits, prepare=False) - torch_probabilities).max() <= 1e-5
    assert main(["export", str(run)]) == 0 and "max abs difference from PyTorch" in capsys.readouterr().out
    from_file = mnistlab.load(run, engine="onnx")  # now RUN/model.onnx, newer than the weights
    assert np.abs(from_file.predict(digits, prepare=False) - torch_probabilities).max() <= 1e-5


def test_missing_onnxruntime_names_the_extra_to_install(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, "seed003")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(MnistlabError, match=r"pip install 'mnistlab\[onnx\]'"):
        mnistlab.load(run, engine="onnx")
    image = tmp_path / "blank.png"
    image.write_bytes(b"")
    assert main(["predict", str(run), str(image), "--engine", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "mnistlab[onnx]" in err and "Traceback" not in err


def test_bad_export_requests_are_one_line_errors(tmp_path):
    with pytest.raises(MnistlabError, match="unknown export format"):
        export.export(make_run(tmp_path, "seed003"), "tflite")
    with pytest.raises(MnistlabError, match="has no model.json"):
        export.export(tmp_path / "not-a-run")
    with pytest.raises(MnistlabError, match="unknown engine"):
        mnistlab.load(make_run(tmp_path, "seed003"), engine="tensorrt")
