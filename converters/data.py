"""Calibration and evaluation samples, streamed with bounded memory.

Accepted forms:

- ``.npy``: one array of preprocessed samples for a single-input model (memory-mapped).
- ``.npz``: arrays keyed by input name (or ``x`` for a single-input model), and optionally ``y``
  (labels). Members are streamed out of the zip in chunks, compressed or not.
- a directory of images (``.jpg .jpeg .png .bmp .webp``), preprocessed with a
  :class:`~edge_agent.model.preprocess.PreprocessSpec`; labels may come from sub-directory names
  (``cat/001.jpg``) when the directory holds only sub-directories.
- a dataset folder of samples from the field (``edgectl collect --out DIR``): ``samples.jsonl``
  lists the files (``images/*.jpg``, preprocessed like an image directory, or ``windows/*.npy``,
  sensor or audio windows read as they are). Labels: each line's ``label`` (an integer class
  index a person fills in; null until then), used when every line has one.

Sample layouts (N samples, the model's input ``[batch, *shape]``):

- ``(N, *shape)``: the usual one, any batch dimension.
- ``(N, 1, *shape)``: N full inputs, each with its batch axis of 1, when the model's batch is
  fixed at 1 or dynamic; rows are read as ``(k, *shape)``.
- ``(N,)``: one value per sample when every dim of ``shape`` is 1 (``[None, 1]``: read as
  ``(k, 1)``). With a dynamic dim in ``shape`` (``[None, None]``), N samples of one value and one
  sample of N values both fit: refused, naming both.

``Dataset.batches`` yields feeds of at most ``batch`` samples; nothing holds the whole set.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import DataError
from edge_agent.model.formats import DATASET_INDEX
from edge_agent.model.preprocess import Preprocessor, PreprocessSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_NP_DTYPES = {
    name: np.dtype(name)
    for name in (
        "float32",
        "float16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}


class RowSource(Protocol):
    """N rows of one array, read by index range."""

    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> np.ndarray: ...


class _ArrayRows:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


class _NpzMemberRows:
    """One array inside an .npz, read sequentially from its zip member without loading it all."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        self._zip: zipfile.ZipFile | None = None
        self._fh: Any = None
        self._pos = 0
        with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
            self.shape, self.fortran, self.dtype, _ = self._header(fh)
        if self.fortran and len(self.shape) > 1:
            raise DataError(f"{path}: array '{member}' is Fortran-ordered; save it C-ordered")
        if self.dtype.hasobject:
            raise DataError(f"{path}: array '{member}' holds Python objects (pickle); refused")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _header(self, fh: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if not shape:
            raise DataError(f"{self.path}: array '{self.member}' is a scalar, not samples")
        return tuple(shape), bool(fortran), np.dtype(dtype), 0

    def __len__(self) -> int:
        return int(self.shape[0])

    def _open(self) -> None:
        self.close()
        self._zip = zipfile.ZipFile(self.path)
        self._fh = self._zip.open(self.member)
        self._header(self._fh)
        self._pos = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._fh is None or start < self._pos:
            self._open()
        if start > self._pos:
            self._fh.read((start - self._pos) * self.row_bytes)
        n = max(0, stop - start)
        raw = self._fh.read(n * self.row_bytes)
        if len(raw) != n * self.row_bytes:
            raise DataError(f"{self.path}: array '{self.member}' is truncated")
        self._pos = stop
        return np.frombuffer(raw, dtype=self.dtype).reshape((n, *self.shape[1:]))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._zip is not None:
            self._zip.close()
        self._fh = self._zip = None


class _SampleRows:
    """Rows of another source in the model's per-sample shape: an ``(N, 1, *shape)`` or ``(N,)``
    array read as ``(k, *shape)``. A reshape of each chunk read, so memory-mapped and streamed
    sources stay lazy."""

    def __init__(self, rows: RowSource, sample_shape: tuple[int, ...]) -> None:
        self.rows, self.sample_shape = rows, sample_shape

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        array = self.rows.read(start, stop)
        return array.reshape((array.shape[0], *self.sample_shape))

    def close(self) -> None:
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()


class _ImageRows:
    def __init__(self, files: Sequence[Path], pre: Preprocessor) -> None:
        self.files, self.pre = list(files), pre

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> np.ndarray:
        import cv2

        out = []
        for path in self.files[start:stop]:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise DataError(f"{path}: not a readable image")
            out.append(self.pre(image))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@dataclass
class Dataset:
    """Samples for the model's inputs, plus optional labels, as streamed row sources."""

    inputs: dict[str, RowSource]
    labels: RowSource | None
    description: str
    dtypes: dict[str, Any] = field(default_factory=dict)
    synthetic: bool = False

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(
        self, *, batch: int = 1, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, batch):
            yield self.read_rows(range(lo, min(lo + batch, stop)))

    def read_rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """One feed holding the given samples (increasing indices read forward, so .npz members
        stream without reopening). Refuses NaN or infinity in float inputs."""
        idx = list(indices)
        contiguous = bool(idx) and idx[-1] - idx[0] == len(idx) - 1
        feed = {}
        for name, src in self.inputs.items():
            if contiguous:
                array = src.read(idx[0], idx[-1] + 1)
            else:
                array = np.concatenate([src.read(i, i + 1) for i in idx])
            array = _cast(array, self.dtypes.get(name))
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = idx[int(np.argmax(~np.isfinite(array.reshape(len(idx), -1)).all(axis=1)))]
                raise DataError(
                    f"{self.description}: sample {bad} of input '{name}' holds NaN or infinity"
                )
            feed[name] = array
        return feed

    def read_labels(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        if self.labels is None:
            return None
        stop = len(self) if stop is None else min(stop, len(self))
        return self.labels.read(start, stop)

    def read_label_rows(self, indices: Sequence[int]) -> np.ndarray | None:
        if self.labels is None or not indices:
            return None
        labels = self.labels
        return np.concatenate([labels.read(i, i + 1) for i in indices])

    def close(self) -> None:
        for src in [*self.inputs.values(), self.labels]:
            close = getattr(src, "close", None)
            if close is not None:
                close()


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is None or array.dtype == dtype:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=dtype)


def load_dataset(
    path: str | Path,
    *,
    input_specs: Sequence[Mapping[str, Any]],
    preprocess: PreprocessSpec | None = None,
) -> Dataset:
    """Open ``path`` as samples for a model with ``input_specs`` (name/shape/dtype dicts)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    names = [str(s["name"]) for s in input_specs]
    dtypes = {str(s["name"]): _NP_DTYPES.get(str(s["dtype"])) for s in input_specs}
    if path.is_dir() and (path / DATASET_INDEX).is_file():
        ds = _samples_dataset(path, input_specs, preprocess)
    elif path.is_dir():
        ds = _image_dataset(path, input_specs, preprocess)
    elif path.suffix == ".npy":
        if len(names) != 1:
            raise DataError(
                f"{path}: a .npy holds one array, but the model has inputs {names}; use .npz"
            )
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path}: not a numeric .npy array ({exc})") from exc
        ds = Dataset(inputs={names[0]: _ArrayRows(array)}, labels=None, description=str(path))
    elif path.suffix == ".npz":
        ds = _npz_dataset(path, names)
    else:
        raise DataError(
            f"{path}: unsupported data file; give a .npy, a .npz (keys: input names or x, and y) "
            "or a directory of images"
        )
    ds.dtypes = dtypes
    try:
        _fit_layouts(ds, input_specs, path)
    except DataError:
        ds.close()
        raise
    return ds


def _npz_dataset(path: Path, names: Sequence[str]) -> Dataset:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {Path(n).stem: n for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not an .npz archive") from exc
    inputs: dict[str, RowSource] = {}
    for name in names:
        key = name if name in members else ("x" if len(names) == 1 and "x" in members else None)
        if key is None:
            raise DataError(
                f"{path}: no array for model input '{name}' (found keys {sorted(members)}; "
                f"name them after the inputs, or 'x' for a single-input model)"
            )
        inputs[name] = _NpzMemberRows(path, members[key])
    # ``y`` holds labels, unless the model has an input of that name.
    labels = _NpzMemberRows(path, members["y"]) if "y" in members and "y" not in names else None
    ds = Dataset(inputs=inputs, labels=labels, description=str(path))
    counts = {len(s) for s in inputs.values()} | ({len(labels)} if labels else set())
    if len(counts) != 1:
        raise DataError(f"{path}: arrays have different sample counts {sorted(counts)}")
    return ds


def _image_dataset(
    path: Path, input_specs: Sequence[Mapping[str, Any]], preprocess: PreprocessSpec | None
) -> Dataset:
    if len(input_specs) != 1:
        raise DataError(f"{path}: an image directory feeds single-input models only")
    spec = input_specs[0]
    if preprocess is None:
        preprocess = PreprocessSpec.for_input_shape(list(spec["shape"]))
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
    labels: RowSource | None = None
    if subdirs and all(f.parent.parent == path for f in files):
        index = {name: i for i, name in enumerate(subdirs)}
        labels = _ArrayRows(np.array([index[f.parent.name] for f in files], np.int64))
    return Dataset(
        inputs={str(spec["name"]): _ImageRows(files, Preprocessor(preprocess))},
        labels=labels,
        description=f"{path} ({len(files)} images)",
    )


class _WindowRows:
    """Sensor or audio windows, one ``.npy`` file each (no pickle), stacked."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        for path in self.files[start:stop]:
            try:
                out.append(np.load(path, allow_pickle=False)[None])
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: not a numeric .npy window ({exc})") from exc
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _samples_dataset(
    path: Path, input_specs: Sequence[Mapping[str, Any]], preprocess: PreprocessSpec | None
) -> Dataset:
    """A folder written by ``edgectl collect``: ``samples.jsonl`` and the files it lists."""
    import json

    if len(input_specs) != 1:
        raise DataError(f"{path}: a samples folder feeds single-input models only")
    index = path / DATASET_INDEX
    rows = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file = path / str(row["file"])
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{index}:{n}: not a sample line (edgectl collect writes them)"
            ) from None
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise DataError(
                f"{index}:{n}: label = {label!r}: expected an integer class index, or null"
            )
        if not file.is_file():
            raise DataError(f"{index}:{n}: {row['file']} is missing")
        rows.append((file, label))
    if not rows:
        raise DataError(f"{index}: lists no samples")
    kinds = {f.suffix.lower() for f, _ in rows}
    if len(kinds) != 1:
        raise DataError(f"{path}: mixes images and windows; collect them into separate folders")
    spec = input_specs[0]
    files = [f for f, _ in rows]
    inputs: RowSource
    if kinds == {".npy"}:
        inputs = _WindowRows(files)
    else:
        pre = preprocess or PreprocessSpec.for_input_shape(list(spec["shape"]))
        inputs = _ImageRows(files, Preprocessor(pre))
    labelled = [lab for _, lab in rows if lab is not None]
    labels = _ArrayRows(np.array(labelled, np.int64)) if len(labelled) == len(rows) else None
    note = "labelled" if labels is not None else f"{len(labelled)} of {len(rows)} labelled"
    return Dataset(
        inputs={str(spec["name"]): inputs},
        labels=labels,
        description=f"{path} ({len(rows)} samples from the field, {note})",
    )


def _fits(got: Sequence[int], want: Sequence[int | None]) -> bool:
    return len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got))


def _fit_layouts(ds: Dataset, input_specs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Check each input's samples against the model's shape, and read the other accepted layouts
    (see the module docstring) as the usual one. DataError for a shape that fits none, and for
    one that fits two readings."""
    if len(ds) == 0:
        raise DataError(f"{path}: holds no samples")
    for spec in input_specs:
        name = str(spec["name"])
        shape = list(spec["shape"])
        batch, want = (shape[0], shape[1:]) if shape else (None, [])
        got = tuple(ds.inputs[name].read(0, 1).shape[1:])
        if _fits(got, want):
            continue
        n = len(ds)
        if shape and batch in (1, None) and got[:1] == (1,) and _fits(got[1:], want):
            # N full inputs, each with its batch axis of 1: rows are its samples.
            ds.inputs[name] = _SampleRows(ds.inputs[name], got[1:])
            continue
        if not got and want and all(w in (1, None) for w in want):
            if None in want:
                raise DataError(
                    f"{path}: samples for input '{name}' have shape ({n},): read as {n} samples "
                    f"of one value or as one sample of {n} values, for a model input of "
                    f"{_dims(shape)}; save them as {(n, *[1] * len(want))} for the first or with "
                    "a leading sample axis of 1 for the second"
                )
            ds.inputs[name] = _SampleRows(ds.inputs[name], tuple(1 for _ in want))
            continue
        raise DataError(
            f"{path}: samples for input '{name}' have shape {[None, *got]}, but the model "
            f"expects {[None, *want]}"
        )


def _dims(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def random_dataset(input_specs: Sequence[Mapping[str, Any]], *, n: int, seed: int = 0) -> Dataset:
    """Standard-normal samples: the fallback when no data is given (fidelity only)."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, RowSource] = {}
    for spec in input_specs:
        dims = [d if d else 1 for d in list(spec["shape"])[1:]]
        dtype = _NP_DTYPES.get(str(spec["dtype"]), np.dtype(np.float32))
        values = rng.standard_normal((n, *dims))
        if dtype.kind in "iub":
            values = np.abs(values).round()  # small non-negative integers / booleans
        inputs[str(spec["name"])] = _ArrayRows(values.astype(dtype))
    return Dataset(
        inputs=inputs, labels=None, description=f"{n} random normal samples", synthetic=True
    )


class Subset:
    """Some samples of a Dataset, by index (increasing)."""

    def __init__(self, ds: Dataset, indices: Sequence[int]) -> None:
        self.ds, self.indices = ds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, *, batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
        for k in range(0, len(self.indices), batch):
            yield self.ds.read_rows(self.indices[k : k + batch])

    def labels(self) -> np.ndarray | None:
        return self.ds.read_label_rows(self.indices)


def evenly(indices: Sequence[int], k: int) -> list[int]:
    """At most ``k`` of ``indices``, evenly spread (sorted data stays representative)."""
    items = list(indices)
    if len(items) <= k:
        return items
    picks = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in picks]


def split_holdout(n: int, *, every: int = 5) -> tuple[list[int], list[int]]:
    """Every ``every``-th sample held out for validation, the rest for calibration: a strided
    split, so data sorted by class still gives both sides every class."""
    if n < 2:
        return list(range(n)), list(range(n))
    held = list(range(every - 1, n, every)) or [n - 1]
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


#: validation samples drawn when no data is given (fidelity only)
RANDOM_VALIDATION_SAMPLES = 64


@dataclass
class DataSplit:
    """The samples a conversion or a pruning run validates and calibrates on."""

    val: Subset
    calib: Subset | None  # None: no --calibration
    source: str  # where the validation samples come from, for the report
    warnings: list[str]
    opened: list[Dataset]  # close() them when done

    def close(self) -> None:
        for ds in self.opened:
            ds.close()


def split_data(
    input_specs: Sequence[Mapping[str, Any]],
    *,
    calibration: Path | None,
    eval: Path | None,
    preprocess: PreprocessSpec | None,
    max_calibration_samples: int,
    max_validation_samples: int,
    fixed_batch: int | None = None,
    sequence: bool = False,
) -> DataSplit:
    """Validation on ``eval`` when given (calibration on all of ``calibration``), else on every
    5th calibration sample (calibration on the rest), else on random inputs (with a warning).
    With a fixed batch > 1, both sides are trimmed to whole batches (DataError if one is left
    empty).

    ``sequence``: the samples are the windows of one stream, in order (a streaming model,
    :mod:`converters.stateful`), so both sides stay contiguous: validation on the first
    ``max_validation_samples`` windows of ``eval``, or on the last fifth of ``calibration``
    (calibration on the windows before it); calibration gets every one of its windows, in
    order (the converter picks at most ``max_calibration_samples`` of them after running the
    float model over all)."""
    if sequence:
        return _split_sequence(
            input_specs,
            calibration=calibration,
            eval=eval,
            preprocess=preprocess,
            max_validation_samples=max_validation_samples,
        )
    warnings: list[str] = []
    opened: list[Dataset] = []
    calib_ds = None
    if calibration is not None:
        calib_ds = load_dataset(calibration, input_specs=input_specs, preprocess=preprocess)
        opened.append(calib_ds)
    step = fixed_batch or 1
    cal_idx: list[int] = []
    if eval is not None:
        eval_ds = load_dataset(eval, input_specs=input_specs, preprocess=preprocess)
        opened.append(eval_ds)
        val_ds, val_idx = eval_ds, evenly(range(len(eval_ds)), max_validation_samples)
        if calib_ds is not None:
            cal_idx = evenly(range(len(calib_ds)), max_calibration_samples)
        source = f"{eval_ds.description} (--eval)"
    elif calib_ds is not None:
        cal_all, held = split_holdout(len(calib_ds))
        cal_idx = evenly(cal_all, max_calibration_samples)
        val_ds, val_idx = calib_ds, evenly(held, max_validation_samples)
        if len(calib_ds) < 2:
            source = f"{calib_ds.description} (the calibration sample itself)"
            warnings.append(
                "one calibration sample: validated on the sample it was calibrated with"
            )
        else:
            source = (
                f"{calib_ds.description} (every 5th sample held out of calibration: {len(val_idx)})"
            )
    else:
        val_ds = random_dataset(input_specs, n=max(RANDOM_VALIDATION_SAMPLES, step))
        val_idx = list(range(len(val_ds)))
        source = val_ds.description
        warnings.append(
            "no --calibration or --eval data: fidelity was measured on random inputs, which says "
            "little about real data"
        )
    if fixed_batch and fixed_batch > 1:
        val_idx = val_idx[: len(val_idx) // step * step]
        cal_idx = cal_idx[: len(cal_idx) // step * step]
        if not val_idx or (calib_ds is not None and not cal_idx):
            raise DataError(
                f"the model's batch size is fixed at {fixed_batch}: give at least {fixed_batch} "
                "samples for calibration and for validation, or make the batch dynamic"
            )
    calib = Subset(calib_ds, cal_idx) if calib_ds is not None else None
    return DataSplit(Subset(val_ds, val_idx), calib, source, warnings, opened)


def _split_sequence(
    input_specs: Sequence[Mapping[str, Any]],
    *,
    calibration: Path | None,
    eval: Path | None,
    preprocess: PreprocessSpec | None,
    max_validation_samples: int,
) -> DataSplit:
    """:func:`split_data` for the windows of one stream: contiguous runs, in order."""
    warnings: list[str] = []
    opened: list[Dataset] = []
    calib = None
    if calibration is not None:
        calib_ds = load_dataset(calibration, input_specs=input_specs, preprocess=preprocess)
        opened.append(calib_ds)
        calib = Subset(calib_ds, range(len(calib_ds)))
    if eval is not None:
        val_ds = load_dataset(eval, input_specs=input_specs, preprocess=preprocess)
        opened.append(val_ds)
        val_idx = list(range(min(len(val_ds), max_validation_samples)))
        source = f"{val_ds.description} (--eval, {len(val_idx)} windows in sequence)"
    elif calib is not None:
        n = len(calib)
        cut = n - max(1, n // 5) if n > 1 else n
        val_ds, val_idx = calib.ds, list(range(cut, n))[:max_validation_samples] or [0]
        calib = Subset(calib.ds, range(cut) if cut else range(n))
        source = (
            f"{val_ds.description} (the last fifth held out of calibration, in sequence: "
            f"{len(val_idx)} windows)"
        )
        if n < 2:
            warnings.append(
                "one calibration window: validated on the window it was calibrated with"
            )
    else:
        val_ds = random_dataset(input_specs, n=RANDOM_VALIDATION_SAMPLES)
        val_idx = list(range(len(val_ds)))
        source = f"{val_ds.description} (in sequence)"
        warnings.append(
            "no --calibration or --eval data: fidelity was measured on a stream of random "
            "inputs, which says little about real data"
        )
    if len(val_ds) > len(val_idx) and eval is not None:
        warnings.append(
            f"validated on the first {len(val_idx)} of {len(val_ds)} windows of the stream; "
            "raise --max-eval-samples to cover all of it"
        )
    return DataSplit(Subset(val_ds, val_idx), calib, source, warnings, opened)
