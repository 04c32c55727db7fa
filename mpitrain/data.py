"""Data sets: loading, checking, and the validation split (each rank's shard: mpitrain.shard).

A data set is a pair of host arrays ``x`` (n, features) and ``y`` (n,) integer labels or
(n, k) targets; for ``source = "file"`` they are memory-mapped, so a rank only reads the
rows of its own shard.  The validation split is fixed by the run seed.

A file is checked once, when it is loaded, completely and cheaply: its arrays' types and
shapes and the zip CRC-32 of each .npz member; then (:func:`check_values`) every value,
training and validation rows alike, each rank reading 1/P of the rows.  So bad data is one
message naming the file, the array, the first bad row and what to do -- never a NaN loss
many steps in, or a model trained on a flipped byte.
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from .config import DataConfig


@dataclass(frozen=True)
class Dataset:
    """Host arrays plus what the model needs to know about them."""

    x: np.ndarray            # (n, features), any float/int dtype; may be a memmap
    y: np.ndarray            # (n,) int labels, or (n, k) targets
    name: str
    classes: int | None      # number of classes for labels; None for regression targets
    fingerprint: str = ""    # names the content (a resume must train on the same data)

    @property
    def features(self) -> int:
        return self.x.shape[1]

    @property
    def target_width(self) -> int:
        """Width the model's output layer must have."""
        if self.y.ndim == 1:
            return self.classes if self.classes is not None else 1
        return self.y.shape[1]

    def batch(self, idx: np.ndarray, dtype, xp) -> tuple:
        """Rows ``idx`` as (inputs, targets) of ``dtype`` on the array module ``xp``.

        Integer labels become one-hot rows, so every loss sees (batch, width) targets.
        """
        x = np.asarray(self.x[idx], dtype=dtype)
        y = np.asarray(self.y[idx])
        if y.ndim == 1 and self.classes is not None:
            onehot = np.zeros((len(idx), self.classes), dtype=dtype)
            onehot[np.arange(len(idx)), y] = 1
            y = onehot
        y = y.astype(dtype, copy=False)
        return xp.asarray(x), xp.asarray(y)


# --------------------------------------------------------------------------- sources
def load(data_cfg: DataConfig, seed: int, rank: int = 0, size: int = 1) -> Dataset:
    """The data set a job names (``[data] source``), its file checked (see the module
    docstring; rank ``rank`` of ``size`` takes its share of the checks)."""
    if data_cfg.source == "digits":
        return digits()
    if data_cfg.source == "synthetic":
        return synthetic(data_cfg, seed)
    assert data_cfg.path is not None  # config.load refuses source = "file" without a path
    return from_file(Path(data_cfg.path), rank, size)


def digits() -> Dataset:
    """The UCI optical handwritten digits (8x8, 1,797 samples, 10 classes), pixels scaled to [0, 1].

    Shipped with the package (the copy scikit-learn bundles; Alpaydin & Kaynak, UCI, CC BY 4.0).
    """
    with resources.files("mpitrain").joinpath("datasets/digits.npz").open("rb") as fh:
        with np.load(fh) as z:
            x, y = z["x"].astype(np.float64) / 16.0, z["y"].astype(np.int64)
    return Dataset(x, y, "digits", 10, "digits")


def synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Seeded generated data: Gaussian class blobs, or a smooth nonlinear regression.

    classification: ``classes`` centres drawn from N(0, I) in ``features`` dimensions; each
    sample is its class centre plus ``noise`` * N(0, I).
    regression: x ~ N(0, I); y = tanh(x . a) + 0.5 sin(x . b) + ``noise`` * N(0, 1), one target.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    n, f = cfg.samples, cfg.features
    if cfg.task == "classification":
        centres = rng.normal(size=(cfg.classes, f))
        y = rng.integers(0, cfg.classes, size=n)
        x = centres[y] + cfg.noise * rng.normal(size=(n, f))
        return Dataset(x, y, f"synthetic-classification-{cfg.classes}", cfg.classes,
                       "synthetic")  # the content follows from [data] keys and the seed
    x = rng.normal(size=(n, f))
    a, b = rng.normal(size=f) / np.sqrt(f), rng.normal(size=f) / np.sqrt(f)
    y = np.tanh(x @ a) + 0.5 * np.sin(x @ b) + cfg.noise * rng.normal(size=n)
    return Dataset(x, y.reshape(n, 1), "synthetic-regression", None, "synthetic")


def from_file(path: Path, rank: int = 0, size: int = 1) -> Dataset:
    """An .npz with arrays ``x`` and ``y``, or a folder holding ``x.npy`` and ``y.npy``.

    Arrays are memory-mapped (for an .npz, only when saved uncompressed, ``np.savez``), so
    each rank reads just the rows of its shard.  ``y`` may hold integer class labels, one-hot
    rows, or float targets.  The CRC-32 of a stored .npz member is checked by one rank of
    ``size`` (x by rank 0, y by rank 1 % size), so the job reads each byte once.
    """
    if path.is_dir():
        arrays = {k: _load_npy(path / f"{k}.npy") for k in ("x", "y")}
    elif path.is_file():
        arrays = {k: _npz_member(path, k, verify=i % size == rank)
                  for i, k in enumerate(("x", "y"))}
    else:
        raise DataError(f"[data] path = {str(path)!r}: no such file or folder",
                        hint="give an .npz with arrays x and y, or a folder with x.npy and y.npy")
    x, y = arrays["x"], arrays["y"]
    where = f"[data] path = {str(path)!r}"
    for name, a in arrays.items():
        _check_dtype(where, name, a.dtype)
    if x.ndim != 2:
        raise DataError(f"{where}: x must be 2-D (samples, features), got shape {x.shape}")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{where}: x holds no data (shape {x.shape})",
                        hint="the file needs at least one sample with at least one feature")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise DataError(f"{where}: y must have one row per sample of x ({len(x)}), "
                        f"got shape {y.shape}")
    classes = None
    if y.ndim == 1 and y.dtype.kind in "biu":
        low = int(y.min())
        if low < 0:
            row = int(np.argmax(np.asarray(y) < 0))
            raise DataError(f"{where}: integer labels in y must be >= 0, found {low} "
                            f"(first at row {row})", hint="class labels count from 0")
        classes = int(y.max()) + 1
    elif y.ndim == 1:
        y = y.reshape(-1, 1)
    elif _one_hot(y):  # one-hot rows: class labels too (accuracy is reported)
        classes = y.shape[1]
    return Dataset(x, y, path.stem, classes, _fingerprint(path))


def _check_dtype(where: str, name: str, dtype: np.dtype) -> None:
    """Training reads real numbers: refuse text, objects, complex numbers, dates."""
    if dtype.kind in "biuf":
        return
    kinds = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers",
             "M": "dates", "m": "time spans", "V": "raw records"}
    what = kinds.get(dtype.kind, f"dtype {dtype}")
    hint = {"c": f"split them into real features: np.column_stack([{name}.real, {name}.imag])",
            "U": f"convert the text to numbers first ({name}.astype(np.float32) if it holds "
                 f"numerals; class names: np.unique({name}, return_inverse=True)[1])",
            "O": f"convert it to a numeric array ({name}.astype(np.float32)) before saving"}
    raise DataError(f"{where}: array '{name}' holds {what} ({dtype}); mpitrain trains on real "
                    f"numbers (bool, integer or float arrays)",
                    hint=hint.get(dtype.kind, f"save {name} as a float or integer array"))


def _fingerprint(path: Path, chunk: int = 1 << 24) -> str:
    """A checksum of a data file's content: an .npz's members' CRC-32s, which its zip
    directory already holds (checked against the bytes at load), or the CRC-32C of the
    .npy files of a folder."""
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            return "npz:" + ",".join(f"{i.filename}={i.CRC:08x}" for i in zf.infolist())
    from crc32c import crc32c
    sums = []
    for name in ("x.npy", "y.npy"):
        crc = 0
        with open(path / name, "rb") as fh:
            while block := fh.read(chunk):
                crc = crc32c(block, crc)
        sums.append(f"{name}={crc:08x}")
    return "npy:" + ",".join(sums)


def _one_hot(y: np.ndarray) -> bool:
    values = np.asarray(y)
    return bool(len(values)) and bool(np.isin(values, (0, 1)).all()) \
        and bool((values.sum(axis=1) == 1).all())


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"[data] path: {path} is missing",
                        hint="a data folder holds x.npy (samples, features) and y.npy") from None
    except ValueError as exc:
        raise DataError(f"[data] path: {path} is not a readable .npy file: {exc}") from None


def _npz_member(path: Path, name: str, verify: bool = True) -> np.ndarray:
    """Array ``name`` of an .npz: memory-mapped if stored uncompressed, else read whole.

    A compressed member's CRC-32 is checked as it is read; a stored one's with ``verify``.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DataError(f"[data] path = {str(path)!r} is not an .npz file",
                        hint="save it with numpy.savez(path, x=..., y=...)") from None
    with zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            raise DataError(f"[data] path = {str(path)!r} has no array '{name}' "
                            f"(it has: {', '.join(n.removesuffix('.npy') for n in zf.namelist())})",
                            hint="the .npz needs arrays named x and y") from None
        if info.compress_type != zipfile.ZIP_STORED:
            try:  # zipfile checks the member's CRC-32 as it decompresses
                with zf.open(info) as fh:
                    return np.lib.format.read_array(fh, allow_pickle=False)
            except zipfile.BadZipFile as exc:
                raise DataError(f"[data] path = {str(path)!r}: array '{name}' is damaged: {exc}",
                                hint="the file changed after it was written; write it again"
                                ) from None
            except ValueError as exc:  # pickled objects (never unpickled), or a bad header
                if "allow_pickle" in str(exc):
                    _check_dtype(f"[data] path = {str(path)!r}", name, np.dtype(object))
                raise DataError(f"[data] path = {str(path)!r}: array '{name}' cannot be read "
                                f"as numbers: {exc}",
                                hint=f"save {name} as a float or integer array") from None
        if verify:
            _check_crc(path, info)
        with open(path, "rb") as raw:
            raw.seek(_member_offset(raw, info))
            version = np.lib.format.read_magic(raw)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(raw)
            offset = raw.tell()
    if dtype.hasobject:  # never memory-map (or unpickle) objects
        _check_dtype(f"[data] path = {str(path)!r}", name, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                     order="F" if fortran else "C")


def _member_offset(raw: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header (30 fixed bytes),
    its name and its extra field, whose lengths the local header holds."""
    raw.seek(info.header_offset + 26)
    name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len)


def _check_crc(path: Path, info: zipfile.ZipInfo, chunk: int = 1 << 24) -> None:
    """The stored (memory-mapped) member's bytes must match the CRC-32 its zip entry holds:
    zipfile checks that only for members it decompresses itself."""
    with open(path, "rb") as raw:
        raw.seek(_member_offset(raw, info))
        crc, left = 0, info.file_size
        while left > 0:
            block = raw.read(min(chunk, left))
            if not block:
                break
            crc, left = zlib.crc32(block, crc), left - len(block)
    if left or crc != info.CRC:
        raise DataError(f"[data] path = {str(path)!r}: array '{info.filename.removesuffix('.npy')}'"
                        f" is damaged: its bytes do not match the CRC-32 stored in the .npz",
                        hint="the file changed after it was written (a flipped byte, a partial "
                             "copy); write it again")


def check_values(dataset: Dataset, val_idx: np.ndarray, rank: int = 0, size: int = 1,
                 rows: int = 1 << 15) -> None:
    """Every value of ``x`` (and of float ``y``) must be finite: NaN or Inf anywhere, in a
    training or a validation row, would poison the replicas or the validation figures.

    Rank ``rank`` of ``size`` checks its contiguous 1/size of the rows, ``rows`` at a time,
    so the job reads the data once; call inside ``World.collective_errors``, which makes the
    lowest failing rank -- the one with the first bad row -- report for all.
    """
    n = len(dataset.x)
    lo, hi = n * rank // size, n * (rank + 1) // size
    for name, a in (("x", dataset.x), ("y", dataset.y)):
        if a.dtype.kind != "f":
            continue
        for start in range(lo, hi, rows):
            block = np.asarray(a[start:min(start + rows, hi)])
            bad = ~np.isfinite(block)
            if bad.any():
                at = np.argwhere(bad)[0]
                row = start + int(at[0])
                value = block[tuple(at)]
                split = "validation" if np.isin(row, val_idx) else "training"
                col = f", column {int(at[1])}" if block.ndim == 2 else ""
                raise DataError(f"data {dataset.name}: array '{name}' holds {value} at row {row}"
                                f"{col} (a {split} sample)",
                                hint="clean the data first, e.g. keep the rows where "
                                     "np.isfinite(x).all(axis=1)")


# --------------------------------------------------------------------------- splitting
def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation samples, fixed by the seed."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5A1])).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_fits(dataset: Dataset, n_train: int, out_width: int, loss: str, batch_size: int,
               size: int, tail: str, global_batch: int | None = None) -> None:
    """The data must fit the model's output layer and loss, and give every rank a batch."""
    if loss == "cross_entropy" and dataset.classes is None:
        y = np.asarray(dataset.y)
        whole = y.shape[1] == 1 and bool(np.all(y == np.round(y)))
        raise DataError(
            f"[model] loss = \"cross_entropy\" needs class labels (integers, or one-hot rows) "
            f"but y of {dataset.name} holds {'whole numbers stored as floats' if whole else 'float targets'}",
            hint=("save y as integers (y.astype(np.int64)) to use them as class labels" if whole
                  else "for regression use [model] loss = \"mse\" and output = \"identity\""))
    if dataset.target_width != out_width:
        raise DataError(*_width_mismatch(dataset, out_width))
    if n_train < size:
        raise DataError(f"{size} ranks but only {n_train} training samples: every rank needs "
                        f"at least one", hint="use fewer ranks or more data")
    if global_batch is not None and global_batch < size:
        raise DataError(f"{size} ranks but the run's global batch is {global_batch} samples: "
                        f"every rank needs at least one", hint=f"use at most {global_batch} ranks")
    how = (f"{size} ranks x batch_size {batch_size} = " if global_batch is None else
           "kept from the run's start: ")
    global_batch = global_batch or batch_size * size
    if tail == "drop" and n_train < global_batch:
        raise DataError(f"the global batch ({how}"
                        f"{global_batch}) is larger than the {n_train} training samples, so "
                        f"tail = \"drop\" leaves no step",
                        hint="lower [data] batch_size, use fewer ranks, or set "
                             "[data] tail = \"weighted\"")


def _width_mismatch(dataset: Dataset, out_width: int) -> tuple[str, str]:
    """(message, hint) for data whose targets do not fit ``out_width`` outputs."""
    set_layers = f"set the last entry of [model] layers to {dataset.target_width}"
    if dataset.classes is None or dataset.y.ndim != 1:
        what = (f"{dataset.classes} classes (one-hot rows)" if dataset.classes is not None
                else f"targets of width {dataset.target_width}")
        return (f"[model] layers ends with {out_width} outputs but the data ({dataset.name}) "
                f"has {what}", set_layers)
    distinct = len(np.unique(np.asarray(dataset.y)))
    message = (f"[model] layers ends with {out_width} outputs but the data ({dataset.name}) "
               f"has {dataset.classes} classes")
    if dataset.classes > 2 * distinct:  # sparse label values: a numbering, not a width
        return (f"{message}: its labels go up to {dataset.classes - 1}, with only {distinct} "
                f"distinct values",
                f"number the labels 0..{distinct - 1} (y = np.unique(y, return_inverse=True)[1])"
                f" and set the last entry of [model] layers to {distinct}")
    return message, set_layers
