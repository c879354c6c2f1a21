"""Tests for mnistlab.data: IDX parsing, verification, lookup order, atomic download, real MNIST."""

import dataclasses
import gzip
import hashlib
import os
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab import data
from mnistlab.errors import MnistlabError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = data.DatasetInfo(
    name="tiny", classes=("a", "b", "c"), mirrors=("http://mirror-a.invalid/", "http://mirror-b.invalid/"),
    files={"train": ("tiny-train-images.gz", "tiny-train-labels.gz"),
           "test": ("tiny-test-images.gz", "tiny-test-labels.gz")},
    sha256={}, gz_md5={}, description="test-only dataset", hflip=False)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 ndim, big-endian dims, payload."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def tiny_split(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, classes, n, dtype=np.uint8)


def write_dataset(folder: Path, info: data.DatasetInfo, n: int, gz: bool = True) -> dict[str, bytes]:
    """Write every split of info into folder (train n images, test n + 1); returns gz name -> IDX bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for offset, (images_name, labels_name) in enumerate(info.files.values()):
        images, labels = tiny_split(n + offset, len(info.classes), seed=n + offset)
        for name, array in ((images_name, images), (labels_name, labels)):
            written[name] = raw = idx_bytes(array)
            if gz:
                (folder / name).write_bytes(gzip.compress(raw))
            else:
                (folder / name.removesuffix(".gz")).write_bytes(raw)
    return written


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated env: no MNISTLAB_DATA, a temp cache, the tiny dataset registered, and no network."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(data.DATASETS, "tiny", TINY)

    def no_network(url, dest):
        raise AssertionError(f"unexpected download of {url}")
    monkeypatch.setattr(data, "_fetch", no_network)
    return tmp_path


# ---------------------------------------------------------------- IDX reading

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = tiny_split(7)
    for array in (images, labels):
        path = tmp_path / f"a{array.ndim}"
        path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))
        read = data.read_idx(path)
        assert read.dtype == np.uint8 and read.shape == array.shape
        assert np.array_equal(read, array)


def corrupt_cases() -> dict[str, bytes]:
    images, _ = tiny_split(4)
    good = idx_bytes(images)
    return {
        "truncated gzip": gzip.compress(good)[:-20],
        "truncated payload": gzip.compress(good[:-5]),
        "extra bytes": gzip.compress(good + b"\x00"),
        "wrong magic": gzip.compress(b"\x00\x00\x0d\x03" + good[4:]),  # dtype 0x0d is float32
        "truncated header": b"\x00\x00\x08\x03\x00\x00",
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_read_idx_rejects_malformed_files(tmp_path, case):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(corrupt_cases()[case])
    with pytest.raises(MnistlabError, match="broken-idx3-ubyte.gz"):
        data.read_idx(path)


# ---------------------------------------------------------------- load: checks on content

def write_split(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write train files with the given arrays and valid test files."""
    write_dataset(folder, TINY, 2)
    (folder / "tiny-train-images.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (folder / "tiny-train-labels.gz").write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.mark.parametrize("images, labels, culprit", [
    (np.zeros((3, 27, 28), np.uint8), np.zeros(3, np.uint8), "tiny-train-images.gz"),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), "tiny-train-labels.gz"),
    (np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 3], np.uint8), "tiny-train-labels.gz"),  # 3 classes
    (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "tiny-train-labels.gz"),
])
def test_load_rejects_bad_dims_counts_and_labels(env, images, labels, culprit):
    write_split(env / "d" / "tiny", images, labels)
    with pytest.raises(MnistlabError, match=culprit):
        data.load("tiny", data_dir=env / "d")


def test_load_rejects_checksum_mismatch(env, monkeypatch):
    written = write_dataset(env / "d" / "tiny", TINY, 5)
    hashes = {name.removesuffix(".gz"): sha256(raw) for name, raw in written.items()}
    monkeypatch.setitem(data.DATASETS, "tiny", dataclasses.replace(TINY, sha256=hashes))
    assert len(data.load("tiny", data_dir=env / "d")) == 5  # matching hashes pass
    hashes["tiny-train-labels"] = "0" * 64
    with pytest.raises(MnistlabError, match=r"tiny-train-labels\.gz.*sha256.*delete it"):
        data.load("tiny", data_dir=env / "d")


def test_load_returns_contiguous_uint8_and_int64(env):
    write_dataset(env / "d" / "tiny", TINY, 6)
    train, test = data.load("tiny", "train", env / "d"), data.load("tiny", "test", env / "d")
    images, labels = tiny_split(6, seed=6)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64 and train.info is TINY
    assert torch.equal(train.images, torch.from_numpy(images)) and torch.equal(train.labels, torch.from_numpy(labels).long())
    assert len(test) == 7
    with pytest.raises(MnistlabError, match="'train', 'test'|train, test"):
        data.load("tiny", "validation", env / "d")


# ---------------------------------------------------------------- lookup order

def test_lookup_order_explicit_env_cache_download(env, monkeypatch):
    explicit, from_env, cache = env / "explicit", env / "from_env", data.cache_dir() / "tiny"
    write_dataset(explicit / "tiny", TINY, 3)
    write_dataset(from_env, TINY, 4, gz=False)  # directly in DIR/, decompressed names
    write_dataset(cache, TINY, 5)
    monkeypatch.setenv(data.DATA_ENV, str(from_env))
    assert len(data.load("tiny", data_dir=explicit)) == 3
    assert len(data.load("tiny")) == 4
    assert data.locate("tiny", env / "empty") == cache  # an explicit dir without the files falls through
    monkeypatch.delenv(data.DATA_ENV)
    assert len(data.load("tiny")) == 5 and data.locate("tiny") == cache
    for path in cache.iterdir():
        path.unlink()
    assert data.locate("tiny") is None
    with pytest.raises(MnistlabError, match="not found"):
        data.load("tiny", download=False)
    assert set(data.available(explicit)) == set(data.DATASETS) and data.available(explicit)["tiny"] == explicit / "tiny"


def test_download_tries_mirrors_in_order_and_verifies(env, monkeypatch):
    sources = write_dataset(env / "source", TINY, 8)
    md5 = {name: hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest() for name, raw in sources.items()}
    monkeypatch.setitem(data.DATASETS, "tiny", dataclasses.replace(TINY, gz_md5=md5))
    calls = []

    def fetch(url, dest):
        calls.append(url)
        mirror, name = url.rsplit("/", 1)
        if name == "tiny-train-images.gz" and "mirror-a" in mirror:
            raise urllib.error.URLError("connection refused")
        # Mirror a serves a different copy of the test labels: its md5 must be refused, then b's taken.
        corrupt = name == "tiny-test-labels.gz" and "mirror-a" in mirror
        dest.write_bytes(gzip.compress(sources[name], mtime=7 if corrupt else 0))
    monkeypatch.setattr(data, "_fetch", fetch)

    dataset = data.load("tiny")
    assert len(dataset) == 8
    assert calls == ["http://mirror-a.invalid/tiny-train-images.gz", "http://mirror-b.invalid/tiny-train-images.gz",
                     "http://mirror-a.invalid/tiny-train-labels.gz", "http://mirror-a.invalid/tiny-test-images.gz",
                     "http://mirror-a.invalid/tiny-test-labels.gz", "http://mirror-b.invalid/tiny-test-labels.gz"]
    assert sorted(p.name for p in (data.cache_dir() / "tiny").iterdir()) == sorted(sources)
    calls.clear()
    data.load("tiny", "test")
    assert calls == []  # cached now


def test_download_verifies_content_sha256(env, monkeypatch):
    sources = write_dataset(env / "source", TINY, 4)
    hashes = {name.removesuffix(".gz"): sha256(raw) for name, raw in sources.items()}
    hashes["tiny-train-images"] = "f" * 64
    monkeypatch.setitem(data.DATASETS, "tiny", dataclasses.replace(TINY, sha256=hashes))
    monkeypatch.setattr(data, "_fetch", lambda url, dest: dest.write_bytes(gzip.compress(sources[url.rsplit("/", 1)[1]])))
    with pytest.raises(MnistlabError, match=r"tiny-train-images\.gz .*any mirror.*sha256"):
        data.load("tiny")
    assert not any((data.cache_dir() / "tiny").iterdir())


def test_failed_download_leaves_no_file_and_explains_offline_fix(env, monkeypatch):
    calls = []

    def half_then_fail(url, dest):
        calls.append(url)
        dest.write_bytes(b"\x1f\x8b" + b"x" * 100)  # half a file, then the connection drops
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(data, "_fetch", half_then_fail)
    with pytest.raises(MnistlabError) as caught:
        data.load("tiny")
    message = str(caught.value)
    assert "any mirror" in message and data.DATA_ENV in message and "network is unreachable" in message
    assert str(data.cache_dir() / "tiny") in message and "\n" not in message
    assert calls == ["http://mirror-a.invalid/tiny-train-images.gz", "http://mirror-b.invalid/tiny-train-images.gz"]
    assert list((data.cache_dir() / "tiny").iterdir()) == []  # neither the file nor a temp file


def test_real_fetch_streams_a_url_to_the_destination(tmp_path):
    source, dest = tmp_path / "source.gz", tmp_path / "dest.part"
    source.write_bytes(os.urandom(200_000))
    data._fetch(source.as_uri(), dest)  # file:// goes through the same urllib path as http(s)
    assert dest.read_bytes() == source.read_bytes()


def test_cache_dir_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "mnistlab"


def test_unknown_dataset_lists_known_names():
    with pytest.raises(MnistlabError, match="mnist, fashion-mnist, kmnist"):
        data.get_info("cifar10")
    with pytest.raises(MnistlabError, match="fashion-mnist"):
        data.load("emnist")


# ---------------------------------------------------------------- registry entries

def test_registry_entries_are_consistent():
    assert list(data.DATASETS) == ["mnist", "fashion-mnist", "kmnist"]
    for name, info in data.DATASETS.items():
        assert info.name == name and len(info.classes) == 10 and info.description
        assert info.mirrors and all(m.startswith(("http://", "https://")) and m.endswith("/") for m in info.mirrors)
        assert set(info.gz_md5) == set(data._all_files(info))
        assert all(len(h) == 32 for h in info.gz_md5.values()) and all(len(h) == 64 for h in info.sha256.values())
    assert [info.hflip for info in data.DATASETS.values()] == [False, True, False]
    assert set(data.DATASETS["mnist"].sha256) == {f.removesuffix(".gz") for f in data._all_files(data.DATASETS["mnist"])}


@pytest.mark.parametrize("name, class_names", [
    ("fashion-mnist", ("T-shirt/top", "Ankle boot")),
    ("kmnist", ("o", "wo")),
])
def test_fashion_and_kmnist_load_from_small_files(env, monkeypatch, name, class_names):
    info = data.DATASETS[name]
    written = write_dataset(env / "d" / name, info, 20)
    # The real content hashes cannot match tiny files: register these files' own hashes instead.
    hashes = {f.removesuffix(".gz"): sha256(raw) for f, raw in written.items()}
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(info, sha256=hashes))
    train, test = data.load(name, "train", env / "d"), data.load(name, "test", env / "d")
    assert (len(train), len(test)) == (20, 21)
    assert train.images.shape == (20, 28, 28) and int(train.labels.max()) < 10
    assert (train.info.classes[0], train.info.classes[-1]) == class_names
    assert data.locate(name, env / "d") == env / "d" / name


# ---------------------------------------------------------------- real MNIST (must not skip)

@pytest.fixture(scope="module")
def real_mnist():
    root = os.environ.get(data.DATA_ENV) or str(REPO_ROOT.parent / "shared" / "datasets")
    if not Path(root).is_dir():
        pytest.fail(f"real MNIST not found: set {data.DATA_ENV} to the folder holding mnist/ "
                    f"(e.g. shared/datasets) or place it at {root}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(data.DATA_ENV, root)
        patch.setenv(data.CACHE_ENV, "/nonexistent/mnistlab-cache")  # only the env-var folder may serve
        return data.load("mnist", "train", download=False), data.load("mnist", "test", download=False)


@pytest.mark.real_data
def test_real_mnist_shapes_counts_and_pixel_stats(real_mnist):
    train, test = real_mnist
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28) and test.labels.shape == (10000,)
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    pixels = train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=5e-5)
    assert pixels.std().item() == pytest.approx(0.3081, abs=5e-5)


@pytest.mark.real_data
def test_real_mnist_train_val_split(real_mnist):
    train = real_mnist[0]
    train_images, train_labels, val_images, val_labels = data.train_val_split(train.images, train.labels, 0.1, seed=0)
    assert (len(train_images), len(train_labels), len(val_images), len(val_labels)) == (54000, 54000, 6000, 6000)
    again = data.train_val_split(train.images, train.labels, 0.1, seed=0)
    assert torch.equal(again[0], train_images) and torch.equal(again[3], val_labels)
    assert not torch.equal(data.train_val_split(train.images, train.labels, 0.1, seed=1)[2], val_images)
    # Split the row indices the same way to see which rows went where.
    train_rows, _, val_rows, _ = data.train_val_split(torch.arange(60000), train.labels, 0.1, seed=0)
    assert torch.equal(train.images[train_rows], train_images) and torch.equal(train.labels[val_rows], val_labels)
    assert not set(train_rows.tolist()) & set(val_rows.tolist())
    assert len(set(train_rows.tolist()) | set(val_rows.tolist())) == 60000
    with pytest.raises(MnistlabError, match="val_fraction"):
        data.train_val_split(train.images, train.labels, 1.0)


def test_verified_copy_in_the_cache_skips_decompression_and_is_remade_when_the_source_changes(env, monkeypatch):
    write_dataset(env / "d", TINY, 6)
    first = data.load("tiny", data_dir=env / "d")
    copies = sorted((data.cache_dir() / "verified" / "tiny").glob("*.npy"))
    assert len(copies) == 2  # the train images and labels
    monkeypatch.setattr(data, "_read_idx", lambda *a, **k: pytest.fail("the verified copy was not used"))
    again = data.load("tiny", data_dir=env / "d")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    monkeypatch.undo()
    monkeypatch.setenv(data.CACHE_ENV, str(env / "cache"))
    monkeypatch.setitem(data.DATASETS, "tiny", TINY)
    copies[-1].write_bytes(b"damaged")  # a damaged copy is made again from the source
    assert torch.equal(data.load("tiny", data_dir=env / "d").images, first.images)
    write_dataset(env / "d", TINY, 7)  # a changed source (new size) is read and verified anew
    assert len(data.load("tiny", data_dir=env / "d")) == 7
    assert len(list((data.cache_dir() / "verified" / "tiny").glob("*.npy"))) == 2  # stale copies replaced
