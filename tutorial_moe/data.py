"""Real image data, offline first: MNIST digits and a second domain for the 20-class experiment.

Two calls cover the book:

* ``load_digits(split)``: MNIST, images ``x`` float32 (N, 1, S, S) in [0, 1], labels ``y`` int64 (N,) 0-9.
* ``load_two_domains(split)``: MNIST (labels 0-9, domain 0) + a second image domain (labels 10-19,
  domain 1), images (N, 1, 32, 32). Seed ``004_25a6c5fe7c08fe0d.txt`` used CIFAR-10 in grayscale; offline
  the second domain is Fashion-MNIST. ``DataSplit.info`` says which ran.

Where the pixels come from (``source``):

* ``"embedded"``: the full MNIST and Fashion-MNIST datasets inside the package, official split (60,000
  train / 10,000 test images each; ``tutorial_moe/data/*.npz``, provenance in ``tutorial_moe/data/DATA.md``).
  Every file is checked against the size and sha256 in ``tutorial_moe/data/manifest.json`` before it is
  read. No network, no files outside the package.
* ``"torchvision"``: MNIST and CIFAR-10 in torchvision's folder layout under :func:`data_dir`, downloaded
  by torchvision when they are missing (so this needs the network once). Errors when unavailable.
* ``"auto"`` (default): the embedded data. The one exception is the second domain of
  ``load_two_domains`` with ``TUTORIAL_MOE_FULL=1``: CIFAR-10 (as in seed 004) when it is on disk or
  downloadable, otherwise the embedded Fashion-MNIST, saying once why.

``limit=N`` takes a stratified subset: every class keeps its share of the split (largest-remainder
rounding of ``N * class count / split size``), and within a class the images are drawn in one fixed
pseudo-random order, so the same call always gives the same images (see :func:`_stratified_indices`).

The decoded uint8 arrays are cached in memory (47 MB for a 60,000-image training split), so only the
first call in a process reads a file; every call then builds its own float32 tensors from them (only
the images it returns), so a caller may change what it gets without touching the cache.

Files on disk are read by the small readers below rather than by torchvision's dataset classes: the
formats are simple, importing torchvision takes seconds, and torchvision's CIFAR-10 class refuses any
folder whose md5 sums differ from the official ones (which rules out testing it on a tiny folder).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import numbers
import os
import pickle
import socket
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import full_mode

__all__ = [
    "DataSplit", "DataUnavailableError", "load_digits", "load_two_domains", "data_dir", "clear_cache",
    "DIGIT_CLASSES", "FASHION_CLASSES", "CIFAR10_CLASSES",
]

EMBEDDED_DIR = Path(__file__).resolve().parent / "data"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
SOURCES = ("auto", "embedded", "torchvision")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 256
# A download that stalls (a firewall dropping packets rather than refusing them) must not hang a
# notebook: torchvision's urllib calls have no timeout of their own.
NETWORK_TIMEOUT_S = 30.0

DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_EMBEDDED_FILES = {"MNIST": "mnist.npz", "Fashion-MNIST": "fashion_mnist.npz"}
# Any fixed number: it decides which images a limit= subset takes within each class, once and for all.
_SUBSET_SEED = 20240607
_CHUNK = 8192  # images converted to float32 at a time when two domains are merged
_IDX_STEMS = {"train": "train", "test": "t10k"}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


class DataUnavailableError(RuntimeError):
    """The requested full dataset is neither on disk nor downloadable (for example offline)."""


class DataSplit(NamedTuple):
    """One split of a dataset.

    x: float32 (N, 1, S, S), pixel values in [0, 1] (0 = background).
    y: int64 (N,), class labels (0-9 for digits, 0-19 for two domains).
    domain: int64 (N,) with 0 = digits and 1 = the other domain, or None for a one-domain dataset.
    info: which source ran and why, in words (print it in a notebook).
    """

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor | None
    info: str

    @property
    def other_domain(self) -> str | None:
        """Name of domain 1 ("CIFAR-10" or "Fashion-MNIST"), None for digits only."""
        if self.domain is None:
            return None
        return "CIFAR-10" if self.info.startswith("MNIST + CIFAR-10") else "Fashion-MNIST"

    @property
    def class_names(self) -> list[str]:
        """Human-readable name of every label, indexed by label."""
        extra = {None: (), "CIFAR-10": CIFAR10_CLASSES, "Fashion-MNIST": FASHION_CLASSES}[self.other_domain]
        return list(DIGIT_CLASSES) + list(extra)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------- validation


def _check_choice(value, allowed: tuple[str, ...], name: str, func: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{func}: {name} must be a str, one of {allowed}; got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"{func}: {name}={value!r} is not allowed; use one of {allowed}")
    return value


def _check_int(value, name: str, func: str, low: int, high: int | None, none_ok: bool) -> int | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "None or an int" if none_ok else "an int"
        raise TypeError(f"{func}: {name} must be {allowed}; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{func}: {name}={value} is out of range; use an int {rng}")
    return value


def data_dir() -> Path:
    """Folder for the full datasets: ``$TUTORIAL_MOE_DATA``, default ``~/.cache/tutorial_moe``."""
    env = os.environ.get("TUTORIAL_MOE_DATA", "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "tutorial_moe"
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"data dir {path} (from TUTORIAL_MOE_DATA={env!r}) is a file, not a folder; point "
            "TUTORIAL_MOE_DATA at a folder (it is created if missing) or unset it to use ~/.cache/tutorial_moe"
        )
    return path


# ------------------------------------------------------------------------------------------ readers
# Each reader returns (images uint8 (N, H, W), labels int64 (N,)) or raises.

_announced: set[str] = set()
_unavailable: dict[tuple, str] = {}  # failed downloads are not retried in the same session


def _announce(message: str) -> None:
    """Print a message about the data source once per session."""
    if message not in _announced:
        _announced.add(message)
        print(f"tutorial_moe.data: {message}")


def _checked_arrays(x: np.ndarray, y: np.ndarray, where: str, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"{where}: expected uint8 images (N, H, W) and N labels with N > 0, got images "
            f"{x.dtype} {x.shape} and labels {y.shape}"
        )
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"{where}: labels must lie in 0..{classes - 1}, found {y.min()}..{y.max()}")
    return x, y


_FIX = ("reinstall tutorial_moe or rebuild the shipped files with "
        "`python scripts/make_embedded_data.py` (see tutorial_moe/data/DATA.md)")


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, 0


@functools.lru_cache(maxsize=8)
def _verify_embedded(path_str: str, stamp: tuple[int, int]) -> None:
    """Compare a shipped file with its size and sha256 in the manifest next to it; raise if they differ.

    Runs once per file and process (``stamp`` (mtime, size) is only part of the cache key, so a
    rebuilt file is checked again). Hashing 42 MB costs about 0.1 s.
    """
    path = Path(path_str)
    manifest_path = path.parent / MANIFEST
    try:
        entry = json.loads(manifest_path.read_text(encoding="utf-8"))["files"][path.name]
        expected_size, expected_sha = int(entry["bytes"]), str(entry["sha256"])
    except FileNotFoundError as e:
        raise ValueError(f"embedded data manifest {manifest_path} is missing; {_FIX}") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"embedded data manifest {manifest_path} has no valid entry for {path.name} "
                         f"({type(e).__name__}: {e}); {_FIX}") from e
    if not path.is_file():
        raise ValueError(f"embedded data file {path} is missing; {_FIX}")
    size = path.stat().st_size
    if size != expected_size:
        raise ValueError(f"embedded data file {path} is truncated or altered: {size:,} bytes, the manifest "
                         f"says {expected_size:,}; {_FIX}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected_sha:
        raise ValueError(f"embedded data file {path} is corrupt: sha256 {digest.hexdigest()}, the manifest "
                         f"{manifest_path} says {expected_sha}; {_FIX}")


@functools.lru_cache(maxsize=8)
def _read_embedded(path_str: str, split: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The decoded uint8 images and int64 labels of one split of a shipped file (cached: see ``_stamp``).

    Only the two zip members of ``split`` are decompressed; numpy reads them in chunks into the final
    arrays, so a load needs little more memory than the arrays themselves.
    """
    path = Path(path_str)
    _verify_embedded(path_str, stamp)
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz[f"x_{split}"], npz[f"y_{split}"]
            meta = json.loads(str(npz["meta"].reshape(-1)[0])) if "meta" in npz.files else {}
    except FileNotFoundError as e:
        raise ValueError(f"embedded data file {path} is missing; {_FIX}") from e
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, ValueError) as e:
        raise ValueError(
            f"embedded data file {path} is corrupt or truncated ({type(e).__name__}: {e}); {_FIX}"
        ) from e
    x, y = _checked_arrays(x, y, f"embedded data file {path} ({split})")
    return x, y, meta


def _embedded(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    path = EMBEDDED_DIR / _EMBEDDED_FILES[dataset]
    x, y, meta = _read_embedded(str(path), split, _stamp(path))
    via = f", {meta['via']}" if meta.get("via") else ""
    return x, y, f"{dataset} {split}", f"embedded in the package: {path.name}{via}"


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format), plain or gzipped: magic 0x00 0x00 0x08 <ndim>, big-endian dims, uint8s."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(f"idx file {path} is unreadable ({e}); delete it so it can be fetched again") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file; delete it so it can be fetched again")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"idx file {path} is truncated: header says {dims}, found {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The image and label files of ``split`` in ``folder`` (plain or .gz), or None if either is missing."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = f"{_IDX_STEMS[split]}-{kind}-ubyte"
        hit = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


@functools.lru_cache(maxsize=8)
def _read_idx_pair(images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    return _checked_arrays(_read_idx(Path(images)), _read_idx(Path(labels)), f"idx files in {Path(images).parent}")


@contextlib.contextmanager
def _network_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_download(name: str, root: Path, train: bool) -> None:
    """Let torchvision fetch (and md5-check) a dataset into ``root``; raises when that is impossible."""
    key = (name, str(root), train)
    if key in _unavailable:
        raise DataUnavailableError(_unavailable[key])
    try:
        from torchvision import datasets
    except ImportError as e:
        _unavailable[key] = f"torchvision is not installed ({e})"
        raise DataUnavailableError(_unavailable[key]) from e
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _network_timeout(NETWORK_TIMEOUT_S):
            getattr(datasets, name)(str(root), train=train, download=True)
    except (RuntimeError, OSError) as e:  # offline: URLError (an OSError) or torchvision's RuntimeError
        reason = " ".join(str(e).split()) or type(e).__name__
        if len(reason) > 200:
            reason = reason[:197] + "..."
        _unavailable[key] = f"torchvision could not download {name} into {root}: {reason}"
        raise DataUnavailableError(_unavailable[key]) from e


def _torchvision_mnist(split: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    """MNIST from torchvision's layout ``<data_dir>/MNIST/raw/``, downloading it if missing."""
    root = data_dir()
    name = "MNIST"
    raw = root / name / "raw"
    files = _idx_pair(raw, split)
    if files is None:
        _torchvision_download(name, root, train=split == "train")
        files = _idx_pair(raw, split)
        if files is None:
            raise DataUnavailableError(f"torchvision reported success but {raw} lacks the {split} idx files")
    x, y = _read_idx_pair(str(files[0]), str(files[1]))
    return x, y, f"MNIST {split}", f"torchvision files in {raw}"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: 'data' uint8 (n, 3072) as R, G, B planes of 32x32, 'labels' n ints.

    Returns grayscale images uint8 (n, 32, 32) using ITU-R 601-2 luma weights, the same as PIL's
    ``convert("L")`` and torchvision's ``Grayscale``. Unpickling is what torchvision does with these
    files too; only read a data dir you trust.
    """
    fix = f"delete {path.parent} so that torchvision downloads CIFAR-10 again"
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"CIFAR-10 batch {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch {path} has data {data.shape} and {len(labels)} labels; "
                         f"expected (n, 3072) and n labels; {fix}")
    rgb = data.reshape(-1, 3, 32, 32).astype(np.int32)
    gray = (299 * rgb[:, 0] + 587 * rgb[:, 1] + 114 * rgb[:, 2] + 500) // 1000
    return gray.astype(np.uint8), labels


@functools.lru_cache(maxsize=4)
def _read_cifar_folder(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(Path(folder) / name) for name in _CIFAR_FILES[split]]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _checked_arrays(x, y, f"CIFAR-10 folder {folder}")


def _torchvision_cifar10(split: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    root = data_dir()
    folder = root / _CIFAR_FOLDER
    needed = _CIFAR_FILES["train"] + _CIFAR_FILES["test"] + ("batches.meta",)
    if not all((folder / n).is_file() for n in needed):
        _torchvision_download("CIFAR10", root, train=split == "train")
    x, y = _read_cifar_folder(str(folder), split)
    return x, y, f"CIFAR-10 {split}", f"in grayscale, torchvision files in {folder}"


# ----------------------------------------------------------------------------------- source choice
# Every raw loader returns (images uint8 (N, H, W), labels int64 (N,), name, where), e.g. name
# "MNIST train" and where "embedded in the package: mnist.npz, ..."; _describe turns them into info.


def _digits_raw(split: str, source: str, full: bool):
    """The shipped MNIST is the official full split, so "auto" never needs the network for digits."""
    if source == "torchvision":
        return _torchvision_mnist(split)
    return _embedded("MNIST", split)


def _other_domain_raw(split: str, source: str, full: bool):
    """Domain 1: CIFAR-10 (as in seed 004) when asked for or, in full mode, when it can be had; else Fashion-MNIST."""
    if source == "embedded" or (source == "auto" and not full):
        return _embedded("Fashion-MNIST", split)
    if source == "torchvision":
        return _torchvision_cifar10(split)
    try:
        return _torchvision_cifar10(split)
    except DataUnavailableError as e:
        x, y, name, where = _embedded("Fashion-MNIST", split)
        _announce(f"TUTORIAL_MOE_FULL=1 but CIFAR-10 is unavailable ({e}); using the embedded Fashion-MNIST "
                  "as the second domain instead")
        return x, y, name, where + "; CIFAR-10 unavailable offline or not on disk"


def _describe(name: str, total: int, kept: int, where: str) -> str:
    """"full dataset" appears only when every image of the split is used (chapters test for it)."""
    if kept >= total:
        return f"{name}: full dataset, {total:,} images ({where})"
    return f"{name}: stratified subset of {kept:,} of {total:,} images ({where})"


# ------------------------------------------------------------------------------------- processing


def _stratified_indices(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` samples in which every class keeps its share, in their original order.

    Class c gets floor(limit * n_c / n) samples, and the samples left over go one each to the classes
    with the largest remainders (ties: the smaller label). Within each class the samples are taken in one
    fixed pseudo-random order (seed ``_SUBSET_SEED``), not file order: MNIST's test file, for one, puts
    its 5,000 easier images first. The same labels and limit always give the same indices.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    _, cls, counts = np.unique(labels, return_inverse=True, return_counts=True)
    cls = cls.reshape(-1)
    share = limit * counts.astype(np.int64)
    take = share // n
    leftover = limit - int(take.sum())
    by_remainder = np.lexsort((np.arange(len(counts)), -(share % n)))
    take[by_remainder[:leftover]] += 1
    key = np.random.default_rng(_SUBSET_SEED).permutation(n)
    order = np.lexsort((key, cls))                     # grouped by class, fixed random order inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[cls[order]]
    return np.flatnonzero(rank < take[cls])


def _to_images(x: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, size, size) in [0, 1].

    Growing 28x28 MNIST-style images to 32x32 pads 2 background pixels on every side instead of
    interpolating: the strokes stay pixel-exact, the digits already sit in a blank margin, and it is
    the classic way MNIST is fed to 32x32 networks (LeNet-5). Any other size change is bilinear
    (antialiased when shrinking).
    """
    t = torch.from_numpy(x.astype(np.float32)).unsqueeze(1).div_(255.0)  # a new, writable array
    h = t.shape[-1]
    if size == h:
        return t
    if size > h and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(t, (p, p, p, p))
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < h).clamp_(0.0, 1.0)


def _build_digits(split, source, limit, image_size, full) -> DataSplit:
    x, y, name, where = _digits_raw(split, source, full)
    keep = _stratified_indices(y, limit)
    info = _describe(name, len(y), len(keep), where)
    if image_size != x.shape[-1]:
        info += f"; resized {x.shape[-1]}x{x.shape[-1]} -> {image_size}x{image_size}"
    images = x if len(keep) == len(y) else x[keep]  # the full split needs no uint8 copy
    return DataSplit(_to_images(images, image_size), torch.from_numpy(y[keep]), None, info)


def _build_two_domains(split, source, limit, image_size, full) -> DataSplit:
    x0, y0, name0, where0 = _digits_raw(split, source, full)
    x1, y1, name1, where1 = _other_domain_raw(split, source, full)
    other = name1.split(" ")[0]
    notes = []
    # One domain far larger than the other (for example a tiny CIFAR-10 folder next to the full MNIST)
    # would let it swamp the task; cap the larger so that neither is more than twice the other.
    n0, n1 = len(y0), len(y1)
    idx0, idx1 = np.arange(n0), np.arange(n1)
    if max(n0, n1) > 2 * min(n0, n1):
        cap = min(n0, n1)
        if n0 > cap:
            idx0 = _stratified_indices(y0, cap)
        else:
            idx1 = _stratified_indices(y1, cap)
        notes.append(f"the larger domain was capped to {cap:,} images to keep the domains balanced")
    y = np.concatenate([y0[idx0], y1[idx1] + 10])
    domain = np.concatenate([np.zeros(len(idx0), np.int64), np.ones(len(idx1), np.int64)])
    source_index = np.concatenate([idx0, idx1])
    # Interleave the domains in a fixed order, so that x[:n] is a fair sample and not only digits.
    perm = np.random.default_rng(4).permutation(len(y))
    keep = perm[_stratified_indices(y[perm], limit)]
    if limit is not None and limit < len(y):
        notes.append(f"stratified subset of {len(keep):,}")
    y, domain, source_index = y[keep], domain[keep], source_index[keep]
    x = torch.empty(len(keep), 1, image_size, image_size)
    for d, images in ((0, x0), (1, x1)):
        rows = np.flatnonzero(domain == d)
        # In chunks, so that the float32 copy of a whole domain (0.25 GB at full size) never exists twice.
        for start in range(0, len(rows), _CHUNK):
            part = rows[start:start + _CHUNK]
            x[torch.from_numpy(part)] = _to_images(images[source_index[part]], image_size)
    if image_size == 32 and x0.shape[-1] == 28:
        notes.append("28x28 images zero-padded to 32x32")
    elif image_size != x0.shape[-1] or image_size != x1.shape[-1]:
        notes.append(f"images resized to {image_size}x{image_size}")
    info0 = _describe(name0, n0, int((domain == 0).sum()), where0)
    info1 = _describe(name1, n1, int((domain == 1).sum()), where1)
    info = (f"MNIST + {other}: labels 0-9 = digits (domain 0), 10-19 = {other} (domain 1). "
            f"{info0}. {info1}" + "".join(f"; {n}" for n in notes))
    return DataSplit(x, torch.from_numpy(y), torch.from_numpy(domain), info)


def load_digits(split: str = "train", source: str = "auto", limit: int | None = None,
                image_size: int = 28) -> DataSplit:
    """Real MNIST digits.

    split: "train" or "test". source: "auto", "embedded" or "torchvision" (see the module docstring).
    limit: at most this many images, a stratified subset (every digit keeps its share of the split,
    the same images on every call; see the module docstring); None for the whole split.
    image_size: side S of the returned images (28 is native; 32 zero-pads; other sizes are bilinear).

    Returns DataSplit(x float32 (N, 1, S, S) in [0, 1], y int64 (N,) 0-9, domain None, info str).
    Embedded (the default): MNIST's official split, 60,000 train / 10,000 test images. ``info`` contains
    "full dataset" exactly when the whole split was returned.
    """
    func = "load_digits"
    split = _check_choice(split, SPLITS, "split", func)
    source = _check_choice(source, SOURCES, "source", func)
    limit = _check_int(limit, "limit", func, 1, None, none_ok=True)
    image_size = _check_int(image_size, "image_size", func, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, none_ok=False)
    full = full_mode()
    try:
        return _build_digits(split, source, limit, image_size, full)
    except DataUnavailableError as e:
        raise DataUnavailableError(
            f"{func}(source='torchvision'): {e}. Connect to the network once (the files are kept in "
            f"{data_dir()}, set by TUTORIAL_MOE_DATA), or use source='embedded' for the shipped data"
        ) from e


def load_two_domains(split: str = "train", source: str = "auto", limit: int | None = None,
                     image_size: int = 32) -> DataSplit:
    """Digits plus a second image domain: the 20-class, two-domain task of seed 004.

    Labels 0-9 are MNIST digits (domain 0), labels 10-19 the classes of domain 1: CIFAR-10 in grayscale
    when it is available (source "torchvision", or "auto" with TUTORIAL_MOE_FULL=1 and the data on disk
    or downloadable), otherwise Fashion-MNIST. ``info`` and ``.other_domain`` say which ran;
    ``.class_names`` names all 20 labels. The two domains are interleaved in a fixed order.
    limit: at most this many images, a stratified subset over the 20 classes (so each domain keeps its
    share); None for all.

    Returns DataSplit(x float32 (N, 1, S, S) in [0, 1], y int64 (N,) 0-19, domain int64 (N,) 0/1, info).
    Embedded: full MNIST + full Fashion-MNIST, 120,000 train / 20,000 test images (at 32x32 the full
    training split is 0.5 GB of float32: pass a limit unless you need it all).
    """
    func = "load_two_domains"
    split = _check_choice(split, SPLITS, "split", func)
    source = _check_choice(source, SOURCES, "source", func)
    limit = _check_int(limit, "limit", func, 1, None, none_ok=True)
    image_size = _check_int(image_size, "image_size", func, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, none_ok=False)
    full = full_mode()
    try:
        return _build_two_domains(split, source, limit, image_size, full)
    except DataUnavailableError as e:
        raise DataUnavailableError(
            f"{func}(source='torchvision'): {e}. Connect to the network once (the files are kept in "
            f"{data_dir()}, set by TUTORIAL_MOE_DATA), or use source='embedded' for the shipped data"
        ) from e


def clear_cache() -> None:
    """Forget every loaded array, failed download and printed notice (tests; or after new files arrive)."""
    for fn in (_verify_embedded, _read_embedded, _read_idx_pair, _read_cifar_folder):
        fn.cache_clear()
    _unavailable.clear()
    _announced.clear()
