"""export: ONNX and TorchScript files that compute what PyTorch computes, int8 ONNX that keeps its accuracy,
and the ONNX Runtime and OpenVINO engines of predict."""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import mnistlab
from mnistlab import data, export, models
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


@pytest.mark.parametrize("name", ["seed003", "seed000", "best_deskew"])  # BatchNorm, Dropout in eval; grid_sample
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


# --- int8 and OpenVINO -----------------------------------------------------------------------------

@pytest.fixture
def trained(served_run, tmp_path):
    """A copy of the shared trained run (seed003, ~90% accurate), free to export into."""
    return Path(shutil.copytree(served_run, tmp_path / "trained"))


def test_openvino_engine_gives_pytorchs_probabilities(tmp_path):
    run = make_run(tmp_path, "seed003")
    digits = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    openvino = mnistlab.load(run, engine="openvino")
    assert np.abs(openvino.predict(digits, prepare=False) - mnistlab.load(run).predict(digits, prepare=False)).max() <= 1e-5


def test_int8_export_keeps_the_accuracy_and_runs_on_openvino(trained, mnist_dir, capsys):
    assert main(["export", str(trained), "--format", "int8", "--data-dir", str(mnist_dir)]) == 0
    printed = capsys.readouterr().out
    reference, int8 = (float(a) / 100 for a in re.findall(r"([\d.]+)%", printed))
    assert (trained / "model.int8.onnx").is_file() and int8 >= reference - export.INT8_MAX_DROP and reference > 0.8
    proto = onnx.load(str(trained / "model.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in proto.graph.node)  # really quantised
    assert {e.key: e.value for e in proto.metadata_props}["dataset"] == "mnist"  # metadata kept
    test = data.load("mnist", "test", mnist_dir)
    images, labels = test.images[:1000], test.labels[:1000].numpy()
    fp32 = mnistlab.load(trained).predict(images, prepare=False).argmax(1)
    for engine in ("openvino", "onnx"):
        predicted = mnistlab.load(trained, engine=engine, int8=True).predict(images, prepare=False).argmax(1)
        print(f"\nint8 on {engine}: agrees with fp32 on {(predicted == fp32).mean():.1%}, accuracy "
              f"{(predicted == labels).mean():.1%} (fp32 {(fp32 == labels).mean():.1%})")
        assert (predicted == fp32).mean() >= 0.97 and (predicted == labels).mean() >= (fp32 == labels).mean() - 0.01


def test_int8_export_that_loses_accuracy_writes_nothing(trained, mnist_dir, monkeypatch):
    monkeypatch.setattr(export, "INT8_MAX_DROP", -0.5)  # demand half a point more than PyTorch: impossible
    with pytest.raises(MnistlabError, match="below PyTorch's .*nothing was written"):
        export.export(trained, "int8", data_dir=mnist_dir)
    assert not list(trained.glob("model.int8.onnx*"))


def test_openvino_errors_are_one_line(trained, tmp_path, monkeypatch, capsys):
    (trained / "model.int8.onnx").write_bytes(b"not an onnx file")  # newer than the weights: it is used
    with pytest.raises(MnistlabError, match="OpenVINO cannot load the model.*export it again"):
        mnistlab.load(trained, engine="openvino", int8=True)
    image = tmp_path / "blank.png"
    image.write_bytes(b"")
    assert main(["predict", str(trained), str(image), "--int8"]) == 2
    assert "int8 runs on the onnx or openvino engine" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["predict", str(trained), str(image), "--engine", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "mnistlab[openvino]" in err and "Traceback" not in err


def test_int8_without_the_file_or_the_data_names_both_ways_out(trained, tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("offline")
    monkeypatch.setattr(data, "_fetch", offline)
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("MNISTLAB_CACHE", str(tmp_path / "no-cache"))
    with pytest.raises(MnistlabError, match="int8 without model.int8.onnx quantises at start.*export RUN --format int8"):
        mnistlab.load(trained, engine="onnx", int8=True)
