"""MNIST-family datasets: registry, IDX reading, lookup, verified download, train/val split."""

import gzip
import hashlib
import math
import os
import struct
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mnistlab.errors import MnistlabError
from mnistlab.runfiles import atomic_path

DATA_ENV = "MNISTLAB_DATA"
CACHE_ENV = "MNISTLAB_CACHE"
TIMEOUT_S = 30
MAX_IDX_BYTES = 1 << 31  # real files are < 50 MB; a corrupt header must not make us allocate terabytes


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order
    files: dict[str, tuple[str, str]]  # split -> (images .gz name, labels .gz name)
    sha256: dict[str, str]  # decompressed IDX name -> sha256 of the decompressed bytes
    gz_md5: dict[str, str]  # .gz name -> md5 of the mirror's compressed file
    description: str
    hflip: bool  # a mirrored image is still the same class
    # How an image was made from its source, for predict.prepare: "mnist" fits the object into a 20x20 box
    # and puts its centre of mass at the centre of 28x28; "fit" fills 28 px and centres its box.
    preparation: str = "mnist"


def _standard_files() -> dict[str, tuple[str, str]]:
    # Every MNIST-format dataset ships under the four names LeCun's MNIST used.
    return {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", classes=tuple("0123456789"),
        # ossci: PyTorch's mirror (pytorch/vision torchvision/datasets/mnist.py); cvdf: TensorFlow Datasets'
        # (tensorflow/datasets url_checksums/mnist.txt). yann.lecun.com is left out: it answers 403/404
        # since 2024 (pytorch/vision#8568, pytorch/pytorch#164238).
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files=_standard_files(),
        # Decompressed-content sha256: shared/datasets/README.md (so re-compressed copies pass too).
        sha256={"train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
        # .gz md5: pytorch/vision torchvision/datasets/mnist.py, class MNIST `resources`.
        gz_md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        description="handwritten digits (LeCun, Cortes, Burges), 60k train + 10k test", hflip=False),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        # Zalando's own S3 site and repo folder (zalandoresearch/fashion-mnist README.md), and Keras' copy
        # (keras-team/keras keras/src/datasets/fashion_mnist.py), whose .gz sha256 equal those TFDS lists for
        # the S3 files (tensorflow/datasets url_checksums/fashion_mnist.txt): the same bytes, so the same md5.
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        files=_standard_files(),
        sha256={},  # no published hash of the decompressed content was found
        # .gz md5: zalandoresearch/fashion-mnist README.md table; the same in torchvision's FashionMNIST.
        gz_md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        description="Zalando article images (Xiao, Rasul, Vollgraf 2017), 60k train + 10k test", hflip=True,
        # Trimmed, longest edge resized to 28, centred, negated (zalandoresearch/fashion-mnist README).
        preparation="fit"),
    "kmnist": DatasetInfo(  # classes: romanised hiragana in label order, as torchvision's KMNIST names them
        name="kmnist", classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        # CODH, the publisher (rois-codh/kmnist download_data.py; also torchvision and TFDS).
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        files=_standard_files(),
        sha256={},  # no published hash of the decompressed content was found
        # .gz md5: pytorch/vision torchvision/datasets/mnist.py, class KMNIST `resources`.
        gz_md5={"train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
                "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
                "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
                "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"},
        description="Kuzushiji-MNIST: cursive hiragana (Clanuwat et al. 2018), 60k train + 10k test", hflip=False),
}


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, 28, 28], contiguous
    labels: torch.Tensor  # int64 [N]
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.labels)


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise MnistlabError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def cache_dir() -> Path:
    """$MNISTLAB_CACHE, else ($XDG_CACHE_HOME or ~/.cache)/mnistlab."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnistlab"


def _bad(path: Path, problem: str) -> MnistlabError:
    return MnistlabError(f"{path}: {problem}; delete it so it is downloaded again, or replace it with an intact copy")


def _read_idx(path: Path, want_digest: bool = False) -> tuple[np.ndarray, str | None]:
    """A uint8 IDX file, gzipped or raw (told apart by content), and the sha256 of its IDX bytes if asked."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] == 0:
                raise _bad(path, f"magic number 0x{magic.hex()} is not a uint8 IDX one (0x00000801..)")
            header = f.read(4 * magic[3])
            if len(header) < 4 * magic[3]:
                raise _bad(path, "IDX header is truncated")
            shape = struct.unpack(f">{magic[3]}I", header)
            size = math.prod(shape)
            if size > MAX_IDX_BYTES:
                raise _bad(path, f"IDX header claims an implausible shape {shape}")
            data = bytearray(size)  # writable, so torch.from_numpy shares it without a copy or warning
            view, got = memoryview(data), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
            if got < size:
                raise _bad(path, f"IDX payload is truncated ({got} of {size} bytes for shape {shape})")
            if f.read(1):
                raise _bad(path, f"has extra bytes after the {size}-byte payload of shape {shape}")
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise _bad(path, f"cannot be read or decompressed ({error})") from error
    digest = hashlib.sha256(magic + header + data).hexdigest() if want_digest else None
    return np.frombuffer(data, np.uint8).reshape(shape), digest


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file (.gz or raw); any malformation raises MnistlabError naming the file."""
    return _read_idx(Path(path))[0]


def _find(folder: Path, gz_name: str) -> Path | None:
    """The file as served (.gz) or decompressed, whichever is in folder."""
    return next((p for p in (folder / gz_name, folder / gz_name.removesuffix(".gz")) if p.is_file()), None)


def _all_files(info: DatasetInfo) -> list[str]:
    return [name for pair in info.files.values() for name in pair]


def _search_dirs(name: str, data_dir: str | Path | None) -> list[Path]:
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    dirs = [Path(explicit).expanduser() / name, Path(explicit).expanduser()] if explicit else []
    return dirs + [cache_dir() / name]


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The first folder holding all of the dataset's files: data_dir (else $MNISTLAB_DATA), then the cache."""
    needed = _all_files(get_info(name))
    return next((d for d in _search_dirs(name, data_dir) if all(_find(d, f) for f in needed)), None)


def available(data_dir: str | Path | None = None) -> dict[str, Path | None]:
    return {name: locate(name, data_dir) for name in DATASETS}


def _fetch(url: str, dest: Path) -> None:
    """Stream url into dest with a progress bar on stderr. Tests replace this to stay offline."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  file=sys.stderr, leave=False) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def _verify_download(path: Path, gz_name: str, info: DatasetInfo) -> None:
    expected = info.sha256.get(gz_name.removesuffix(".gz"))
    if expected:  # the content hash is what matters; it also proves the file decompresses and parses
        digest = _read_idx(path, want_digest=True)[1]
        if digest != expected:
            raise MnistlabError(f"decompressed sha256 {digest[:12]}.. is not the expected {expected[:12]}..")
    elif gz_name in info.gz_md5:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != info.gz_md5[gz_name]:
            raise MnistlabError(f"md5 {digest} is not the expected {info.gz_md5[gz_name]}")


def _download(info: DatasetInfo) -> Path:
    """Fetch the missing files into the cache: each to a temp file, verified, then renamed into place."""
    folder = cache_dir() / info.name
    folder.mkdir(parents=True, exist_ok=True)
    for gz_name in _all_files(info):
        if _find(folder, gz_name):
            continue
        last_error = "no mirror is known"
        for mirror in info.mirrors:
            try:
                with atomic_path(folder / gz_name) as tmp:  # readers never see half a file
                    _fetch(mirror + gz_name, tmp)
                    _verify_download(tmp, gz_name, info)
                break
            except (OSError, HTTPException, MnistlabError) as error:
                last_error = f"{mirror + gz_name}: {error}"
                print(f"mnistlab: download failed, trying the next mirror ({last_error})", file=sys.stderr)
        else:
            raise MnistlabError(
                f"could not download {gz_name} for {info.name} from any mirror ({last_error}); "
                f"place the files in {folder} or set {DATA_ENV} to a folder that holds them")
    return folder


def _read_verified(path: Path, info: DatasetInfo) -> np.ndarray:
    """The file's array, decompressed and verified once, then read from a raw .npy copy in the cache
    (keyed on the source's path, size, modification time and expected hash) so later loads skip
    gzip and sha256: loading MNIST goes from about 0.9 s to 0.4 s."""
    stem, stat = path.name.removesuffix(".gz"), path.stat()
    expected = info.sha256.get(stem)
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{expected}".encode()).hexdigest()[:16]
    copy = cache_dir() / "verified" / info.name / f"{stem}-{key}.npy"
    try:
        return np.load(copy, allow_pickle=False)
    except (OSError, ValueError):  # absent (or damaged: made again below)
        pass
    array, digest = _read_idx(path, want_digest=expected is not None)
    if expected and digest != expected:
        raise _bad(path, f"content sha256 {digest[:12]}.. is not that of the original {info.name} file "
                         f"({expected[:12]}..)")
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        for stale in copy.parent.glob(f"{stem}-*.npy"):
            stale.unlink(missing_ok=True)
        with atomic_path(copy) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    except OSError:
        pass  # a read-only cache only costs speed
    return array


def load(name: str, split: str = "train", data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Find (or download into the cache), verify and load one split as whole tensors."""
    info = get_info(name)
    if split not in info.files:
        raise MnistlabError(f"unknown split {split!r} for {name}; use one of: {', '.join(info.files)}")
    folder = locate(name, data_dir) or (_download(info) if download else None)
    if folder is None:
        searched = ", ".join(str(d) for d in _search_dirs(name, data_dir))
        raise MnistlabError(f"{name} files not found in {searched}; place them in {cache_dir() / name}, "
                            f"set {DATA_ENV} to a folder that holds them, or allow downloading")
    images_path, labels_path = (_find(folder, f) for f in info.files[split])
    images, labels = _read_verified(images_path, info), _read_verified(labels_path, info)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise _bad(images_path, f"images have shape {images.shape}, expected N x 28 x 28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise _bad(labels_path, f"holds labels of shape {labels.shape} for the {len(images)} images "
                                f"in {images_path.name}")
    if len(labels) and labels.max() >= len(info.classes):
        raise _bad(labels_path, f"label {labels.max()} is out of range for {len(info.classes)} classes")
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels).long(), info)


def train_val_split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, val_images, val_labels) from a seeded random permutation."""
    if not 0 < val_fraction < 1:
        raise MnistlabError(f"val_fraction must be between 0 and 1, got {val_fraction}; use e.g. 0.1")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(images) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val]
