"""What a ``.tflite`` file's own metadata says about feeding it and reading it: the input's
normalization and the label files, as the TFLite Support metadata schema (``M001``, the one
MediaPipe, Model Maker and the TFLite Task Library write) stores them.

The metadata is a flatbuffer in the model's buffer named ``TFLITE_METADATA``; the files it
names (``labelmap.txt``…) are packed into the ``.tflite`` file as a zip archive appended to it.
Only the fields used here are read, with flatbuffers' table API (field ids as in
``metadata_schema.fbs``: ModelMetadata.subgraph_metadata 3; SubGraphMetadata
.input_tensor_metadata 2, .output_tensor_metadata 3; TensorMetadata.process_units 4,
.associated_files 6; ProcessUnit.options 0 (type) and 1; NormalizationOptions.mean 0, .std 1;
AssociatedFile.name 0, .type 2). A file without metadata, metadata this cannot read, or a
runtime without the flatbuffer schema (tflite-runtime alone: then only the properties below
are read) gives an empty result: the model is fed and read as without it.

Ultralytics' TFLite exports carry their own metadata (task, class names, image size…) as a
member of that archive: ``metadata.json`` (JSON, Ultralytics 8.3 and later: a zip appended
with no TFLite metadata at all) or, before, one text file (``temp_meta.txt``) holding the
dict as Python writes it, named by TFLite metadata as the output's label file. Either is
read as :attr:`TfliteMetadata.properties` (JSON, or Python literals only: nothing is run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.common.files import file_identity
from edge_agent.model.export_metadata import literal

log = logging.getLogger(__name__)

METADATA_NAME = "TFLITE_METADATA"
#: ProcessUnitOptions' member for NormalizationOptions
_NORMALIZATION = 1
#: AssociatedFileType: labels of an axis (a classifier's classes), of values (a detector's)
_LABEL_FILE_TYPES = (2, 3)


@dataclass(frozen=True)
class TfliteMetadata:
    """``mean`` / ``std``: the first input's normalization ((x - mean) / std on 0..255
    pixels), empty when none is given; ``labels``: per output index, the labels its metadata
    names, one a line; ``properties``: the exporter's own metadata packed into the file (an
    Ultralytics export's ``task``, ``names``…), empty when there is none."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    labels: dict[int, tuple[str, ...]] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


#: the files read from an archive: at most this many bytes each (no zip bomb)
MAX_LABEL_FILE = 1 << 20
#: what :func:`read_metadata` found, per file (its path, size and modification time): the
#: tuner's trials and swaps load the same file again
_SEEN: dict[tuple[str, int, int], TfliteMetadata] = {}


def read_metadata(path: Path) -> TfliteMetadata:
    """The metadata of the ``.tflite`` file at ``path`` (empty when it has none or it cannot
    be read here), read once a file. Without the flatbuffer schema (tflite-runtime alone) only
    the exporter's :attr:`~TfliteMetadata.properties` are read."""
    try:
        key = file_identity(path)
    except OSError:
        return TfliteMetadata()
    if key in _SEEN:
        return _SEEN[key]
    found = TfliteMetadata()
    try:
        with _archive(path) as archive:
            meta = _metadata_buffer(path)
            if meta is not None:
                found = _parse(meta, archive)
            properties = _properties(archive)
        if properties:
            found = TfliteMetadata(found.mean, found.std, found.labels, properties)
    except Exception as exc:  # a damaged or newer metadata: fed and read as without it
        log.warning("%s: its TFLite metadata cannot be read (%s); not used", path.name, exc)
    _SEEN[key] = found
    return found


def _metadata_buffer(path: Path) -> bytes | None:
    """The TFLite metadata flatbuffer of a model file, else None (none, or no schema here:
    then the file is not read whole)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return bytes(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


class _Table:
    """A flatbuffer table, read by field id."""

    def __init__(self, table: Any, buf: bytearray, pos: int) -> None:
        self._t = table.Table(buf, pos)
        self._table = table

    def _offset(self, slot: int) -> int:
        return int(self._t.Offset(4 + 2 * slot))

    def child(self, slot: int) -> _Table | None:
        o = self._offset(slot)
        if not o:
            return None
        return _Table(self._table, self._t.Bytes, self._t.Indirect(o + self._t.Pos))

    def children(self, slot: int) -> list[_Table]:
        o = self._offset(slot)
        if not o:
            return []
        start = self._t.Vector(o)
        return [
            _Table(self._table, self._t.Bytes, self._t.Indirect(start + 4 * i))
            for i in range(self._t.VectorLen(o))
        ]

    def floats(self, slot: int) -> tuple[float, ...]:
        from flatbuffers import number_types  # type: ignore[import-untyped]

        o = self._offset(slot)
        if not o:
            return ()
        return tuple(float(x) for x in self._t.GetVectorAsNumpy(number_types.Float32Flags, o))

    def byte(self, slot: int) -> int:
        from flatbuffers import number_types

        o = self._offset(slot)
        return int(self._t.Get(number_types.Uint8Flags, o + self._t.Pos)) if o else 0

    def string(self, slot: int) -> str:
        o = self._offset(slot)
        return bytes(self._t.String(o + self._t.Pos)).decode() if o else ""


def _parse(meta: bytes, archive: zipfile.ZipFile | None) -> TfliteMetadata:
    import flatbuffers
    from flatbuffers import table

    buf = bytearray(meta)
    root = _Table(table, buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    subgraphs = root.children(3)
    if not subgraphs:
        return TfliteMetadata()
    graph = subgraphs[0]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    inputs = graph.children(2)
    for unit in inputs[0].children(4) if inputs else []:
        options = unit.child(1)
        if unit.byte(0) == _NORMALIZATION and options is not None:
            mean, std = options.floats(0), options.floats(1)
            break
    if not (mean and std and len(mean) in (1, 3) and len(std) in (1, 3) and all(std)):
        mean, std = (), ()  # none, or none this can use: fed as without it
    labels: dict[int, tuple[str, ...]] = {}
    for index, tensor in enumerate(graph.children(3)):
        for f in tensor.children(6):
            text = None if archive is None else _member(archive, f.string(0))
            if f.byte(2) in _LABEL_FILE_TYPES and text is not None:
                lines = [line.strip() for line in text.splitlines()]
                while lines and not lines[-1]:  # a trailing newline, as the Task Library reads
                    lines.pop()
                labels[index] = tuple(lines)
                break
    return TfliteMetadata(mean=mean, std=std, labels=labels)


@contextlib.contextmanager
def _archive(path: Path) -> Iterator[zipfile.ZipFile | None]:
    """The zip archive appended to a model file with associated files (its directory read
    from the end of the file, not the whole file), else None."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        yield None
        return
    with archive:
        yield archive


#: an archive member read for :func:`_properties`: at most this many of them are looked at
MAX_PROPERTY_FILES = 8


def _properties(archive: zipfile.ZipFile | None) -> dict[str, Any]:
    """The exporter's metadata packed into the archive: the first ``.json`` or ``.txt`` member
    that holds a JSON object or a Python dict literal with a ``names`` or ``task`` key (an
    Ultralytics export), else empty. A label file is neither and is passed over."""
    if archive is None:
        return {}
    for name in archive.namelist()[:MAX_PROPERTY_FILES]:
        if not name.endswith((".json", ".txt")):
            continue
        text = _member(archive, name)
        if text is None or not text.lstrip().startswith("{"):
            continue
        found = _mapping(text)
        if found is not None and ("names" in found or "task" in found):
            return {str(k): v for k, v in found.items()}
    return {}


def _mapping(text: str) -> dict[Any, Any] | None:
    """``text`` as JSON, else as a Python literal (:func:`~edge_agent.model.export_metadata
    .literal`: nothing is run); a dict, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        value = literal(text.strip())
    return value if isinstance(value, dict) else None


def _member(archive: zipfile.ZipFile, name: str) -> str | None:
    """A member's text, or None: missing, too large, or unreadable (the rest is still used)."""
    try:
        if archive.getinfo(name).file_size > MAX_LABEL_FILE:
            return None
        return archive.read(name).decode("utf-8-sig", errors="replace")
    except Exception:  # missing, damaged, encrypted, compressed in a way zipfile cannot read
        return None


__all__ = ["METADATA_NAME", "TfliteMetadata", "read_metadata"]
