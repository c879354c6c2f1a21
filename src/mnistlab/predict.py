"""Use a trained model on people's own images: read them safely, prepare them the way the data set
was made, classify them.

The most common reason an MNIST model fails on a user's handwriting is preparation, not the model:
MNIST digits are white on black, fitted into a 20x20 box keeping their aspect ratio, and placed in a
28x28 image so that their centre of mass is at the centre. `prepare` does exactly that to any
image, and it is the one preparation the CLI, the Python API and the web server use.

Reading order: read_image (untrusted bytes -> PIL image) -> prepare (any image -> uint8 28x28) ->
Predictor (a run folder's model: prepare + batched inference, torch or ONNX Runtime).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import data, models
from .errors import MnistlabError
from .runfiles import atomic_path

# --- Reading untrusted image files ----------------------------------------------------------------

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # what Pillow may try; never EPS (Ghostscript) or the rest
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_BYTES = 10 * 1024 * 1024  # 10 MB: a phone photo is 2-5 MB
MAX_SIDE = 4096               # pixels per side; also keeps a decoded image under 4096*4096*4 = 64 MB


def read_image(source: bytes | str | os.PathLike) -> Image.Image:
    """A decoded PIL image from a file path or bytes, refusing what a server must not decode: non-images
    and formats other than FORMATS, files over MAX_BYTES, images over MAX_SIDE per side (checked from the
    header, before decoding), decompression bombs and truncated files. GIF and WebP give their first frame."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, raw = "the image", bytes(source)
        if len(raw) > MAX_BYTES:
            raise _too_big(name, len(raw))
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise MnistlabError(f"{name}: no such file; check the path")
        if not path.is_file():
            raise MnistlabError(f"{name}: is not a regular file; pass an image file")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # never more than the limit into memory, even if the file grows
        except OSError as err:
            raise MnistlabError(f"{name}: cannot be read ({err.strerror}); check its permissions") from None
        if len(raw) > MAX_BYTES:
            raise _too_big(name, path.stat().st_size)
    if not raw:
        raise MnistlabError(f"{name}: is empty (0 bytes); send the image file's content")
    with warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are refusals here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb(name, err) from None
        except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
            why = "not in a known image format" if isinstance(err, UnidentifiedImageError) else _first_line(err)
            raise MnistlabError(f"{name}: not a readable image ({why}); "
                                f"send a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file") from None
        width, height = image.size
        if width > MAX_SIDE or height > MAX_SIDE:
            raise MnistlabError(f"{name}: {width}x{height} pixels is over the {MAX_SIDE}x{MAX_SIDE} limit; "
                                "scale the image down first")
        if width == 0 or height == 0:
            raise MnistlabError(f"{name}: has no pixels ({width}x{height}); send a real image")
        try:
            image.load()  # decodes now, so truncation shows here and not later
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb(name, err) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise MnistlabError(f"{name}: the {image.format} data is truncated or corrupt ({_first_line(err)}); "
                                "send the complete file") from None
    return image


def _too_big(name: str, size: int) -> MnistlabError:
    return MnistlabError(f"{name}: {size / 2**20:.1f} MB is over the {MAX_BYTES // 2**20} MB limit; "
                         "send a smaller (scaled-down or compressed) image")


def _bomb(name: str, err: Exception) -> MnistlabError:
    return MnistlabError(f"{name}: refused as a decompression bomb ({_first_line(err)}); "
                         f"send an image of at most {MAX_SIDE}x{MAX_SIDE} pixels")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- Preparation: any image -> uint8 [28, 28], white on black, the data set's way ---------------

CANVAS = 28
# The box the object is fitted into, keeping its aspect ratio: MNIST's 20x20 (LeCun et al.); Fashion-MNIST
# resized the longest edge to 28 and centred the image (zalandoresearch/fashion-mnist README).
BOX = {"mnist": 20, "fit": 28}
# Where MNIST puts the centre of mass, in pixel indices: measured over the 10,000 test digits, the mean is
# (13.99, 14.01) with std 0.29 -- integer shifts that put it at (14, 14).
CENTRE = 14.0
# Background and ink: pixels brighter than the background by less than NOISE of the ink's peak are
# background (paper grain, JPEG ringing); fewer than MIN_CONTRAST grey levels of difference is a blank image.
NOISE = 0.1
MIN_CONTRAST = 24.0
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, what Pillow's convert("L") uses


def to_gray(image) -> np.ndarray:
    """float32 [H, W] grey levels in 0..255 from a PIL image, numpy array or tensor: grey, RGB or RGBA
    (transparency composited on white), channels first or last; floats in [0, 1] are scaled by 255."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = np.asarray(image, np.float32)
            return array / 257 if image.mode.startswith("I;16") else _scaled(array)
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
            image = image.convert("RGBA")
        elif image.mode != "L":
            image = image.convert("RGB")
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise MnistlabError(f"cannot read an image from a {type(image).__name__}; pass a PIL image, "
                            "a numpy array or a torch tensor")
    array = image
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise MnistlabError(f"an image of shape {tuple(array.shape)} is neither grey [H, W] nor colour "
                            "[H, W, 3|4] / [3|4, H, W]; pass one image at a time")
    if array.dtype == np.uint8:  # the common case (decoded files, canvases): already 0..255 and finite
        array = array.astype(np.float32)
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 257
    elif array.dtype == np.bool_:
        array = array.astype(np.float32) * 255
    else:
        array = _scaled(array.astype(np.float32))
    if array.ndim == 2:
        return array
    gray = array[..., :3] @ LUMA
    if array.shape[-1] == 4:  # alpha over white paper
        alpha = array[..., 3] / 255
        gray = gray * alpha + 255 * (1 - alpha)
    return gray


def _scaled(array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise MnistlabError("the image holds NaN or infinite values; pass finite grey levels")
    if array.max() <= 1 and array.min() >= 0:  # the Keras habit: images / 255
        array = array * 255
    return np.clip(array, 0, 255)


def white_on_black(gray: np.ndarray, stretch: bool = True) -> np.ndarray:
    """Ink levels in [0, 1] on a 0 background. The background is the median of the border pixels (the
    paper; an object rarely fills the border); it is lighter than the middle of the range for dark ink
    on light paper, which is then inverted. stretch: the ink's peak becomes 1 (MNIST's strokes are
    saturated); without it levels keep their grey (Fashion-MNIST's articles are not uniformly white)."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    background = float(np.median(border))
    low, high = float(gray.min()), float(gray.max())
    if background > (low + high) / 2:
        gray, background = 255 - gray, 255 - background
    ink = gray - background
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise MnistlabError(f"the image is blank (its ink differs from the background by {peak:.0f} of 255 "
                            "grey levels); draw or photograph something with more contrast")
    floor = NOISE * peak
    scale = (peak - floor) if stretch else 255.0
    return np.clip((ink - floor) / scale, 0, 1)


def preparation_of(dataset: str) -> str:
    """How the images of `dataset` were made: "mnist" (20x20 box, centre of mass) or "fit" (fit 28x28)."""
    return data.get_info(dataset).preparation


def prepare(image, dataset: str = "mnist") -> torch.Tensor:
    """Any image -> uint8 [28, 28] as the data set's images were made.

    The image is made white on black (dark-on-light is detected and inverted), cropped to its ink,
    resized (anti-aliased) so its longer side is 20 px keeping the aspect ratio, and pasted into 28x28
    with its centre of mass at the centre: the MNIST way. Data sets whose preparation is "fit"
    (Fashion-MNIST) fill 28 px with the object and centre its box, without stretching its grey levels.
    A blank image raises MnistlabError."""
    how = preparation_of(dataset)
    levels = white_on_black(to_gray(image), stretch=how == "mnist")
    rows, cols = np.flatnonzero(levels.any(1)), np.flatnonzero(levels.any(0))
    crop = torch.from_numpy(np.ascontiguousarray(levels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    height, width = crop.shape
    scale = BOX[how] / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    # Bilinear with antialias: a triangle filter widened by the scale factor, like Pillow's resize;
    # positive weights, so no ringing outside [0, 1].
    box = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    box = box.clamp(0, 1)
    top, left = place(box, how)
    canvas = torch.zeros(CANVAS, CANVAS)
    canvas[top:top + size[0], left:left + size[1]] = box
    return canvas.mul(255).round().to(torch.uint8)


def place(box: torch.Tensor, how: str) -> tuple[int, int]:
    """Top-left corner of `box` in the canvas: its centre of mass at CENTRE (MNIST), or its middle at the
    canvas's middle (fit). Whole pixels, as MNIST did; clamped so no ink leaves the canvas."""
    height, width = box.shape
    if how == "fit":
        return (CANVAS - height) // 2, (CANVAS - width) // 2
    mass = box.sum()
    com_row = (box.sum(1) * torch.arange(height)).sum() / mass
    com_col = (box.sum(0) * torch.arange(width)).sum() / mass
    top = min(max(round(CENTRE - com_row.item()), 0), CANVAS - height)
    left = min(max(round(CENTRE - com_col.item()), 0), CANVAS - width)
    return top, left


def as_images(images) -> list:
    """Split a batch into single images: a PIL image or 2-D array is one image; a list holds images of any
    sizes; a 3-D array is [N, H, W] (or one colour image [H, W, 3|4]); a 4-D array is [N, H, W, C] or
    [N, C, H, W] with C in 1, 3, 4."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4)):
            return [images]
        if images.ndim in (3, 4):
            return list(images)
        raise MnistlabError(f"images of shape {tuple(images.shape)}: pass [H, W], [N, H, W], [N, H, W, C] "
                            "or [N, C, H, W]")
    raise MnistlabError(f"cannot read images from a {type(images).__name__}; pass PIL images, numpy "
                        "arrays or torch tensors (or a list of them)")


def prepare_batch(images, dataset: str = "mnist") -> torch.Tensor:
    """uint8 [N, 28, 28]: `prepare` applied to each image of a batch (see as_images)."""
    batch = as_images(images)
    if not batch:
        raise MnistlabError("no images to prepare; pass at least one")
    return torch.stack([prepare(image, dataset) for image in batch])


def as_dataset_images(images) -> torch.Tensor:
    """uint8 [N, 28, 28] from images already made the data set's way (prepare=False): uint8 0..255 or
    floats in [0, 1], with or without a channel axis."""
    batch = torch.as_tensor(np.array(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim == 4 and 1 in (batch.shape[1], batch.shape[-1]):
        batch = batch.squeeze(1 if batch.shape[1] == 1 else -1)
    if batch.ndim != 3 or tuple(batch.shape[1:]) != (CANVAS, CANVAS):
        raise MnistlabError(f"prepare=False needs images of 28x28 (got shape {tuple(batch.shape)}); "
                            "pass prepare=True to prepare images of any size")
    if batch.dtype != torch.uint8:
        batch = batch.float()
        batch = (batch * 255 if batch.max() <= 1 else batch).clamp(0, 255).round().to(torch.uint8)
    return batch


# --- Predictor: a run folder's model on any images -------------------------------------------------

ENGINES = ("torch", "onnx", "openvino")
PREDICT_BATCH = 256  # the evaluation batch (evaluate.EVAL_BATCH), measured fastest on a 2-core CPU


class Predictor:
    """A trained run, ready to classify images: `mnistlab.load(run).predict(images)`, as in Keras.

    It knows the run's data set (hence its preparation) and class names. engine="onnx" runs the same
    network in ONNX Runtime (the `onnx` extra), engine="openvino" in OpenVINO (the `openvino` extra),
    from RUN/model.onnx when it is newer than the weights, else from an export made in memory;
    int8=True runs the int8 model instead (RUN/model.int8.onnx, or one quantised in memory)."""

    def __init__(self, run: str | os.PathLike, engine: str = "torch", int8: bool = False):
        if engine not in ENGINES:
            raise MnistlabError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
        if int8 and engine == "torch":
            raise MnistlabError("int8 runs on the onnx or openvino engine; add --engine openvino (or onnx)")
        self.run = Path(run)
        self.net, self.arch = models.load_model(self.run)
        self.engine, self.int8 = engine, int8
        self.classes: list[str] = list(self.arch.classes)
        self.dataset: str = self.arch.dataset
        # A run of a data set this version does not know is prepared the MNIST way.
        self._prepare_as = self.dataset if self.dataset in data.DATASETS else "mnist"
        self.preparation = preparation_of(self._prepare_as)
        self._session = None
        if engine != "torch":
            from .export import session
            self._session = session(self.run, engine, int8, self.net, self.arch)

    def __repr__(self) -> str:
        return f"Predictor({str(self.run)!r}, model={self.arch.name}, dataset={self.dataset}, engine={self.engine}{', int8' if self.int8 else ''})"

    def prepare(self, images) -> torch.Tensor:
        """uint8 [N, 28, 28]: the images as the model sees them (the run's data set's preparation)."""
        return prepare_batch(images, self._prepare_as)

    def predict(self, images, prepare: bool = True, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Class probabilities, float32 [N, num_classes], as Keras's model.predict returns them.

        images: PIL images, arrays or tensors of any size (see as_images). prepare=False takes images
        that already are the data set's 28x28 (e.g. its own test images) as they are."""
        batch = self.prepare(images) if prepare else as_dataset_images(images)
        return self.predict_logits(batch, batch_size).softmax(1).numpy()

    def predict_logits(self, images_u8: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
        """fp32 logits for prepared uint8 images [N, 28, 28], batch by batch, on the chosen engine."""
        if self._session is None:
            from .evaluate import predict_logits
            return predict_logits(self.net, images_u8, batch_size, channels_last=False)
        return torch.cat([torch.from_numpy(self._session(models.to_input(images_u8[i:i + batch_size], False)
                                                         .numpy()))
                          for i in range(0, len(images_u8), batch_size)])

    def summary(self) -> None:
        """Print the Keras-style table of layers, output shapes and parameters."""
        print(models.summary(self.net, self.arch.name))

    def evaluate(self, images=None, labels=None, prepare: bool = False):
        """Loss and accuracy (evaluate.Metrics) on labelled images, as Keras's model.evaluate(x, y); without
        images, the full analysis on the run's test set (`mnistlab evaluate RUN`). Labelled images are taken
        as the data set's own 28x28 unless prepare=True."""
        from . import evaluate
        if images is None:
            return evaluate.evaluate_run(self.run)
        if labels is None:
            raise MnistlabError("evaluate(images, labels) needs the labels too")
        batch = self.prepare(images) if prepare else as_dataset_images(images)
        logits = self.predict_logits(batch)
        labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        if len(labels) != len(logits):
            raise MnistlabError(f"{len(logits)} images but {len(labels)} labels; pass one label per image")
        return evaluate.Metrics(test_loss=F.cross_entropy(logits, labels).item(),
                                test_accuracy=(logits.argmax(1) == labels).float().mean().item(),
                                num_test=len(labels))

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class name, probability) pairs, most probable first."""
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.classes[c], float(p[c])) for c in row] for p, row in zip(probabilities, order)]


def load(run: str | os.PathLike, engine: str = "torch", int8: bool = False) -> Predictor:
    """A run folder's model with Keras's habits: .predict(images), .evaluate(x, y), .summary()."""
    return Predictor(run, engine, int8)


def image_files(paths) -> list[Path]:
    """The given files, and the image files (by suffix) inside given folders, walked recursively in
    sorted order. A path that does not exist is kept, so that the caller reports it."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


@dataclass
class FilePrediction:
    """One file's result for `mnistlab predict`: the top classes, or why the file could not be read."""
    file: str
    label: str | None = None
    probability: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["top_k"] = [{"label": label, "probability": p} for label, p in self.top_k]
        return {key: value for key, value in out.items() if value is not None}


def predict_files(predictor: Predictor, files: list[Path], top_k: int = 3,
                  show_input: str | os.PathLike | None = None) -> list[FilePrediction]:
    """Classify image files in one batch; a file that cannot be read or prepared gets its error and the
    others are still classified. show_input: folder to save each 28x28 input the model saw, as PNG."""
    rows, prepared = [], []
    for path in files:
        try:
            prepared.append(predictor.prepare(read_image(path))[0])
            rows.append(FilePrediction(str(path)))
        except MnistlabError as err:
            rows.append(FilePrediction(str(path), error=str(err)))
    if not prepared:
        return rows
    images = torch.stack(prepared)
    good = [row for row in rows if row.error is None]
    for row, top in zip(good, predictor.top_k(predictor.predict(images, prepare=False), top_k)):
        row.label, row.probability, row.top_k = top[0][0], top[0][1], top
    if show_input:
        save_inputs(images, [Path(row.file) for row in good], Path(show_input))
    return rows


def save_inputs(images_u8: torch.Tensor, files: list[Path], folder: Path) -> list[Path]:
    """Each prepared image as FOLDER/<file stem>.png (a number added when stems repeat), written atomically."""
    written, taken = [], set()
    for image, file in zip(images_u8, files):
        name, n = f"{file.stem}.png", 1
        while name in taken:
            n += 1
            name = f"{file.stem}-{n}.png"
        taken.add(name)
        with atomic_path(folder / name) as tmp:
            Image.fromarray(image.numpy()).save(tmp, format="PNG")
        written.append(folder / name)
    return written
