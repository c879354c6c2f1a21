"""predict: reading untrusted images, the MNIST preparation, the Predictor and `mnistlab predict`."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import mnistlab
from mnistlab import models, predict
from mnistlab.errors import MnistlabError

ROWS = torch.arange(28.0)


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    weights = image.float()
    mass = weights.sum()
    return (weights.sum(1) @ ROWS / mass).item(), (weights.sum(0) @ ROWS / mass).item()


def ink_box(image: torch.Tensor) -> tuple[int, int]:
    """Height and width of the bounding box of the non-zero pixels."""
    rows, cols = torch.nonzero(image.any(1)), torch.nonzero(image.any(0))
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def seven(height=300, width=300, top=30, left=40, size=120, thickness=18) -> np.ndarray:
    """A dark "7" (a bar and a diagonal) on light paper, uint8 [height, width], off-centre."""
    paper = np.full((height, width), 230, np.uint8)
    paper[top:top + thickness, left:left + size] = 20
    rows = np.arange(top, top + int(size * 1.4))
    cols = left + size - (rows - top) * size // int(size * 1.4) // 2
    for shift in range(thickness):  # one whole-array assignment per pixel of stroke width
        paper[rows, np.clip(cols - shift, 0, width - 1)] = 20
    return paper


# --- prepare -----------------------------------------------------------------------------------

def test_dark_on_light_and_light_on_dark_give_the_same_image():
    photo = seven()
    assert torch.equal(predict.prepare(photo), predict.prepare(255 - photo))


def test_an_off_centre_digit_gets_its_centre_of_mass_at_the_centre_and_a_20px_box():
    for top, left in ((10, 10), (130, 170), (30, 150)):
        prepared = predict.prepare(seven(top=top, left=left))
        assert prepared.dtype == torch.uint8 and prepared.shape == (28, 28)
        row, col = centre_of_mass(prepared)
        assert abs(row - 14) <= 1 and abs(col - 14) <= 1, (row, col)
        assert max(ink_box(prepared)) == 20
        assert prepared.max() == 255 and prepared[0].max() == 0  # stretched; the border stays background


def test_aspect_ratio_is_kept():
    bar = np.zeros((400, 400), np.uint8)
    bar[50:250, 100:180] = 255  # 200 x 80: 20 x 8 once fitted into the 20 px box
    height, width = ink_box(predict.prepare(bar))
    assert height == 20 and width == 8


def test_real_mnist_digits_come_back_almost_unchanged(mnist_dir):
    from mnistlab import data
    digits = data.load("mnist", "test", mnist_dir).images[:500]
    prepared = predict.prepare_batch(digits)
    rows = [centre_of_mass(image)[0] for image in prepared]
    assert abs(np.mean(rows) - 14) < 0.1  # MNIST's own centring convention
    assert (prepared.float() - digits.float()).abs().mean() < 5  # of 255 grey levels, per pixel


def test_colour_rgba_and_float_inputs_are_the_same_digit():
    gray = seven()
    expected = predict.prepare(gray)
    rgb = np.stack([gray] * 3, -1)
    assert torch.equal(predict.prepare(rgb), expected)
    assert torch.equal(predict.prepare(Image.fromarray(rgb)), expected)
    assert torch.equal(predict.prepare(torch.from_numpy(rgb).permute(2, 0, 1)), expected)  # channels first
    assert (predict.prepare(gray.astype(np.float32) / 255).int() - expected.int()).abs().max() <= 1
    # A drawing on a transparent canvas: ink where alpha is opaque, nothing elsewhere -> as on white paper.
    rgba = np.zeros((*gray.shape, 4), np.uint8)
    rgba[..., 3] = np.where(gray < 128, 255, 0)
    on_white = np.where(gray < 128, 0, 255).astype(np.uint8)
    assert torch.equal(predict.prepare(Image.fromarray(rgba, "RGBA")), predict.prepare(on_white))


def test_fit_preparation_fills_28px_and_centres_the_box_without_the_centre_of_mass_shift():
    shirt = np.full((300, 200), 255, np.uint8)
    shirt[20:280, 30:130] = 60     # a dark article, 260 x 100, on white
    shirt[20:120, 30:130] = 200    # a light upper half: its mass is low, its box is not
    prepared = predict.prepare(shirt, dataset="fashion-mnist")
    height, width = ink_box(prepared)
    assert height == 28 and width == 11
    cols = torch.nonzero(prepared.any(0)).flatten()
    assert cols.min() == (28 - width) // 2
    assert prepared.max() < 220  # grey levels are kept, not stretched to 255


def test_blank_images_raise_a_clear_error():
    for blank in (np.zeros((50, 50), np.uint8), np.full((50, 50), 200, np.uint8),
                  np.random.default_rng(0).integers(100, 110, (50, 50), dtype=np.uint8)):
        with pytest.raises(MnistlabError, match="blank"):
            predict.prepare(blank)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4, 5)), np.zeros((0, 5)), np.zeros((5, 5, 7)), "a string"])
def test_unreadable_arrays_raise_a_clear_error(bad):
    with pytest.raises(MnistlabError):
        predict.prepare(bad)


# --- read_image ----------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height with one tiny IDAT: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_read_image_reads_every_supported_format_from_bytes_and_files(fmt, tmp_path):
    raw = encode(Image.fromarray(seven()), fmt)
    image = predict.read_image(raw)
    assert image.size == (300, 300)
    path = tmp_path / f"seven.{fmt.lower()}"
    path.write_bytes(raw)
    from_file = predict.prepare(predict.read_image(path))
    assert (from_file.float() - predict.prepare(seven()).float()).abs().mean() < 8  # JPEG/GIF are lossy


def test_read_image_takes_the_first_frame_of_an_animated_gif():
    frames = [Image.fromarray(seven()), Image.fromarray(255 - np.zeros((300, 300), np.uint8))]
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(raw)).n_frames == 2
    assert torch.equal(predict.prepare(predict.read_image(raw)), predict.prepare(predict.read_image(encode(frames[0], "GIF"))))


def test_read_image_refuses_each_bad_input_with_one_line_naming_it(tmp_path):
    png = encode(Image.fromarray(seven()), "PNG")
    jpeg = encode(Image.fromarray(seven()), "JPEG")
    tiff = encode(Image.fromarray(seven()), "TIFF")
    cases = {
        b"": "empty",
        b"hello, this is not an image": "not a readable image",
        tiff: "not a readable image",                       # a real image, but not a format we accept
        png[:len(png) // 2]: "truncated or corrupt",
        jpeg[:len(jpeg) // 2]: "truncated or corrupt",
        png_header(5000, 20): "over the 4096x4096 limit",
        png_header(10_000, 10_000): "decompression bomb",   # 100 MP: Pillow's bomb warning, as an error
        png_header(20_000, 20_000): "decompression bomb",   # 400 MP: Pillow's DecompressionBombError
        b"\0" * (predict.MAX_BYTES + 1): "over the 10 MB limit",
    }
    for raw, problem in cases.items():
        with pytest.raises(MnistlabError, match=problem) as caught:
            predict.read_image(raw)
        assert "\n" not in str(caught.value)
    big = tmp_path / "big.png"
    big.write_bytes(png + b"\0" * predict.MAX_BYTES)
    with pytest.raises(MnistlabError, match="big.png.*over the"):
        predict.read_image(big)
    with pytest.raises(MnistlabError, match="no such file"):
        predict.read_image(tmp_path / "missing.png")
    with pytest.raises(MnistlabError, match="not a regular file"):
        predict.read_image(tmp_path)


# --- Predictor -------------------------------------------------------------------------------------

@pytest.fixture
def untrained_run(tmp_path):
    torch.manual_seed(0)
    net = models.create_model("seed003")
    run = tmp_path / "run"
    models.save_model(net, models.Architecture("seed003", {}, 10, list("0123456789"), "mnist"), run)
    return run


def test_predictor_predicts_probabilities_for_any_kind_of_batch(untrained_run):
    model = mnistlab.load(untrained_run)
    photo = seven()
    probabilities = model.predict([photo, Image.fromarray(photo), torch.from_numpy(photo)])
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert np.allclose(probabilities, probabilities[:1], atol=1e-6)  # one digit in three containers
    assert model.predict(np.stack([photo] * 4)).shape == (4, 10)    # [N, H, W]
    digits = predict.prepare_batch([photo] * 2)
    assert np.allclose(model.predict(digits.float() / 255, prepare=False), model.predict([photo]), atol=1e-6)
    assert model.classes == list("0123456789") and model.dataset == "mnist"
    ((label, probability), *rest), = model.top_k(probabilities[:1], k=3)
    assert len(rest) == 2 and probability == probabilities[0].max()


def test_predictor_evaluate_and_summary(untrained_run, capsys):
    model = mnistlab.load(untrained_run)
    digits = predict.prepare_batch([seven()] * 3)
    metrics = model.evaluate(digits, [7, 7, 1])
    assert metrics.num_test == 3 and 0 <= metrics.accuracy <= 1 and metrics.loss > 0
    model.summary()
    assert "Total params: 93,322" in capsys.readouterr().out
    with pytest.raises(MnistlabError, match="labels"):
        model.evaluate(digits, [1])


# --- The key test: MNIST test digits made to look like a user's photo --------------------

def photo_like(digits: torch.Tensor, canvas: int = 300, seed: int = 0) -> list[bytes]:
    """Each digit as a phone photo of a felt-pen digit on paper would be: dark ink on light grey paper,
    strokes widened (a 3x3 max filter at 4x scale: about +0.5 px at MNIST's scale, +2-3 px in the photo),
    100-180 px tall at a random place of a 300x300 canvas, sensor noise, saved as JPEG (quality 75)."""
    rng = np.random.default_rng(seed)
    ink = torch.nn.functional.interpolate(digits.float()[:, None] / 255, scale_factor=4, mode="bilinear")
    ink = torch.nn.functional.max_pool2d(ink, 3, stride=1, padding=1)[:, 0]
    paper, pen = 235.0, 40.0
    photos = []
    for image, size in zip(ink, rng.integers(100, 181, len(digits))):
        size = int(size)
        big = torch.nn.functional.interpolate(image[None, None], size=(size, size), mode="bilinear",
                                              antialias=True)[0, 0].numpy()
        top, left = rng.integers(0, canvas - size + 1, 2)
        photo = np.full((canvas, canvas), paper, np.float32)
        photo[top:top + size, left:left + size] -= big * (paper - pen)
        photo += rng.normal(0, 4, photo.shape).astype(np.float32)
        photos.append(encode(Image.fromarray(np.clip(photo, 0, 255).round().astype(np.uint8)), "JPEG", quality=75))
    return photos


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """seed003 after one epoch on 20,000 MNIST training images (12-20 s on one thread): ~97% on the test set."""
    from mnistlab.config import TrainConfig
    from mnistlab.train import fit
    run = tmp_path_factory.mktemp("trained") / "run"
    fit(TrainConfig(model="seed003", epochs=1, limit_train=20_000, val_split=0, threads=1),
        out=run, data_dir=mnist_dir, progress=False)
    return run


def test_preparation_recovers_plain_mnist_accuracy_on_photo_like_digits(trained_run, mnist_dir):
    from mnistlab import data
    test = data.load("mnist", "test", mnist_dir)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:1000]
    digits, labels = test.images[pick], test.labels[pick].numpy()
    model = mnistlab.load(trained_run)
    photos = [predict.read_image(raw) for raw in photo_like(digits)]
    assert photos[0].size == (300, 300) and photos[0].format == "JPEG"

    plain = (model.predict(digits, prepare=False).argmax(1) == labels).mean()
    prepared = (model.predict(photos).argmax(1) == labels).mean()
    # Without the preparation, only inverted and shrunk to 28x28: what a naive user would feed the model.
    naive_inputs = np.stack([255 - np.asarray(photo.convert("L").resize((28, 28), Image.BILINEAR)) for photo in photos])
    naive = (model.predict(naive_inputs, prepare=False).argmax(1) == labels).mean()
    print(f"\naccuracy on 1000 MNIST test digits: plain {plain:.4f}, photo-like prepared {prepared:.4f}, "
          f"photo-like naive {naive:.4f}")
    assert plain > 0.95                  # the model is trained
    assert prepared >= plain - 0.01      # the preparation recovers plain accuracy within 1 point
    assert naive < plain - 0.3           # and the photos really are hard without it


# --- mnistlab predict -------------------------------------------------------------------------------

def write_images(folder, count=3):
    """count photo-like digits as PNG, JPEG, BMP, GIF, WebP files in folder (and a sub-folder)."""
    formats = ["PNG", "JPEG", "BMP", "GIF", "WEBP"]
    paths = []
    for i in range(count):
        fmt = formats[i % len(formats)]
        path = folder / ("sub" if i % 2 else "") / f"digit{i}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.fromarray(seven(top=20 + 10 * i, left=30 + 20 * i)), fmt))
        paths.append(path)
    return paths


def test_cli_predict_files_folders_top_k_and_show_input(untrained_run, tmp_path, capsys):
    from mnistlab.cli import main
    paths = write_images(tmp_path / "images", 5)
    (tmp_path / "images" / "notes.txt").write_text("not an image, and not an image suffix: skipped")
    shown = tmp_path / "shown"
    assert main(["predict", str(untrained_run), str(tmp_path / "images"), "--top-k", "2",
                 "--show-input", str(shown)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and sorted(line.split()[0] for line in lines) == sorted(map(str, paths))
    for line in lines:
        file, label, probability, top, *pairs = line.split()
        assert label in "0123456789" and 0 < float(probability) <= 1 and top == "top-2:" and len(pairs) == 4
    saved = sorted(shown.glob("*.png"))
    assert [p.stem for p in saved] == sorted(p.stem for p in paths)
    expected = predict.prepare(predict.read_image(paths[0]))
    assert torch.equal(torch.from_numpy(np.array(Image.open(shown / f"{paths[0].stem}.png"))), expected)


def test_cli_predict_json_matches_the_python_api(untrained_run, tmp_path, capsys):
    from mnistlab.cli import main
    paths = write_images(tmp_path, 2)
    assert main(["predict", str(untrained_run), *map(str, paths), "--json", "--top-k", "10"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    probabilities = mnistlab.load(untrained_run).predict([predict.read_image(p) for p in paths])
    assert out["dataset"] == "mnist" and len(out["predictions"]) == 2
    for row, expected in zip(out["predictions"], probabilities):
        assert len(row["top_k"]) == 10
        assert row["label"] == str(expected.argmax()) and abs(row["probability"] - expected.max()) < 1e-6
        assert abs(sum(t["probability"] for t in row["top_k"]) - 1) < 1e-4


def test_cli_predict_reports_each_bad_file_and_exits_nonzero_without_a_traceback(untrained_run, tmp_path, capsys):
    from mnistlab.cli import main
    good, = write_images(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "blank.png").write_bytes(encode(Image.new("L", (40, 40), 255), "PNG"))
    missing = tmp_path / "missing.jpg"
    assert main(["predict", str(untrained_run), str(good), str(tmp_path / "broken.png"),
                 str(tmp_path / "blank.png"), str(missing)]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 and str(good) in captured.out
    errors = captured.err.strip().splitlines()
    assert "broken.png: not a readable image" in errors[0] and "blank" in errors[1] and "no such file" in errors[2]
    assert "3 of 4 files could not be classified" in errors[-1] and "Traceback" not in captured.err
    assert main(["predict", str(untrained_run), str(tmp_path), "--json"]) == 2  # JSON carries the errors too
    rows = __import__("json").loads(capsys.readouterr().out)["predictions"]
    assert [("error" in row) for row in rows] == [True, True, False]  # sorted: blank, broken, digit0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(untrained_run), str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
