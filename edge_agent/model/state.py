"""Recurrent state carried between the windows of a stream: which model inputs and outputs are
state, and one state per stream.

A streaming model (a voice-activity detector, a keyword spotter) takes its previous state as an
input and returns the next one as an output, to be fed back with the next window of the same
stream. Silero VAD v5 takes ``state`` [2, 1, 128] and returns ``stateN``; v4 took ``h`` and ``c``
and returned ``hn`` and ``cn``; many keyword spotters name the pairs ``*_in`` / ``*_out``.

A :class:`StatePair` is one such input and output, with the state's shape and initial value.
The pairs of a model come from its bundle's manifest when it declares them (``"state"``, see
:mod:`edge_agent.model.bundle`), else from :func:`detect_state_pairs`, which pairs an input with
an output by name (the rules in :data:`NAMING_RULES`) and keeps the pair only when both have the
same shape and dtype.

:class:`StreamState` keeps one state per stream name: :meth:`StreamState.feeds` adds a stream's
state inputs to a window's feed (the initial value when the stream has none yet),
:meth:`StreamState.update` keeps the state outputs of the run, :meth:`StreamState.reset` forgets a
stream's state (a restarted stream starts afresh). ``edge_agent.model.loader.LoadedModel.infer``
does all three around one inference.

numpy only (the device side).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import ModelError
from edge_agent.model.runtimes.base import TensorSpec

log = logging.getLogger(__name__)

#: How an input's name finds its output's (compared without regard to case), in order.
NAMING_RULES = (
    ("NAME -> NAMEN / NAMEn", "state -> stateN (Silero VAD v5), h -> hn, c -> cn (v4)"),
    ("NAME_in -> NAME_out", "keyword spotters: stream_in -> stream_out"),
)


def _dims(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class StatePair:
    """A model input that takes the state and the output that returns the next one.

    ``shape`` is the state's full shape (a dynamic dimension of the model's tensor counts as 1:
    one stream); ``dtype`` what the runtime takes for it (float32 for a quantized tensor, which
    the runtime quantizes); ``initial`` the value every element starts from."""

    input: str
    output: str
    shape: tuple[int, ...]
    initial: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for key in ("input", "output"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ModelError(f"state pair: {key} = {value!r}: must be a tensor name")
        if self.input == self.output:
            raise ModelError(
                f"state pair {self.input!r} -> {self.output!r}: the input and the output must be "
                "two tensors"
            )
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ModelError(
                f"state pair {self.input!r} -> {self.output!r}: shape {list(shape)}: every "
                "dimension must be a size >= 1"
            )
        object.__setattr__(self, "shape", shape)
        initial = self.initial
        if isinstance(initial, bool) or not isinstance(initial, (int, float)):
            raise ModelError(
                f"state pair {self.input!r} -> {self.output!r}: initial = {initial!r}: must be a "
                "number"
            )
        if not math.isfinite(initial):
            raise ModelError(
                f"state pair {self.input!r} -> {self.output!r}: initial = {initial!r}: must be "
                "finite"
            )
        object.__setattr__(self, "initial", float(initial))
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise ModelError(
                f"state pair {self.input!r} -> {self.output!r}: dtype = {self.dtype!r}: not a "
                "numpy dtype"
            ) from None
        object.__setattr__(self, "dtype", dtype.name)

    def initial_value(self) -> np.ndarray:
        """A new array of the initial state."""
        return np.full(self.shape, self.initial, dtype=self.dtype)

    def to_manifest(self) -> dict[str, Any]:
        """The bundle manifest's entry for this pair (the shape comes from the model)."""
        return {"input": self.input, "output": self.output, "initial": self.initial}


def _fed_dtype(spec: TensorSpec) -> str:
    """What a runtime takes for the tensor: float32 for a quantized one (it quantizes)."""
    return "float32" if spec.quantized else spec.dtype


def _pair(inp: TensorSpec, out: TensorSpec, *, initial: float = 0.0) -> StatePair:
    return StatePair(
        input=inp.name,
        output=out.name,
        shape=tuple(d or 1 for d in inp.shape),
        initial=initial,
        dtype=_fed_dtype(inp),
    )


def _mismatch(inp: TensorSpec, out: TensorSpec) -> str | None:
    """Why ``inp`` and ``out`` cannot be a state pair, or None."""
    if tuple(inp.shape) != tuple(out.shape):
        return (
            f"input '{inp.name}' {_dims(inp.shape)} and output '{out.name}' "
            f"{_dims(out.shape)} differ in shape"
        )
    if _fed_dtype(inp) != _fed_dtype(out):
        return (
            f"input '{inp.name}' ({_fed_dtype(inp)}) and output '{out.name}' "
            f"({_fed_dtype(out)}) differ in dtype"
        )
    return None


def _partners(name: str) -> tuple[str, ...]:
    """The output names (lower case) that :data:`NAMING_RULES` pair with input ``name``."""
    low = name.lower()
    found = [f"{low}n"]
    if low.endswith("_in") and len(low) > 3:
        found.append(f"{low[:-3]}_out")
    return tuple(found)


def detect_state_pairs(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> tuple[StatePair, ...]:
    """The state pairs of a model, by name (:data:`NAMING_RULES`), each confirmed by equal
    shapes and dtypes. A name match whose tensors differ is not a pair (logged). Each output
    pairs with one input at most; inputs are taken in the model's order."""
    by_name = {o.name.lower(): o for o in outputs}
    taken: set[str] = set()
    pairs = []
    for inp in inputs:
        for candidate in _partners(inp.name):
            out = by_name.get(candidate)
            if out is None or out.name in taken or out.name == inp.name:
                continue
            why = _mismatch(inp, out)
            if why is not None:
                log.info("not a state pair: %s", why)
                continue
            pairs.append(_pair(inp, out))
            taken.add(out.name)
            break
    return tuple(pairs)


def match_state_pairs(
    declared: Sequence[Mapping[str, Any]],
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    where: str = "the bundle's state",
) -> tuple[StatePair, ...]:
    """Declared pairs (a manifest's ``state`` entries: ``input``, ``output``, optional
    ``initial``) checked against the model's tensors. ModelError (one line) for a name the model
    does not have, or tensors that differ in shape or dtype."""
    ins = {s.name: s for s in inputs}
    outs = {s.name: s for s in outputs}
    pairs = []
    for i, entry in enumerate(declared):
        name_in, name_out = entry.get("input"), entry.get("output")
        label = f"{where}[{i}] {name_in!r} -> {name_out!r}"
        if name_in not in ins:
            raise ModelError(
                f"{label}: the model has no input {name_in!r} (inputs: {', '.join(ins)}); fix the "
                "entry or rebuild the bundle"
            )
        if name_out not in outs:
            raise ModelError(
                f"{label}: the model has no output {name_out!r} (outputs: {', '.join(outs)}); "
                "fix the entry or rebuild the bundle"
            )
        why = _mismatch(ins[name_in], outs[name_out])
        if why is not None:
            raise ModelError(f"{label}: {why}; fix the entry or re-export the model")
        pairs.append(_pair(ins[name_in], outs[name_out], initial=entry.get("initial", 0.0)))
    seen_in = [p.input for p in pairs]
    seen_out = [p.output for p in pairs]
    for names in (seen_in, seen_out):
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ModelError(f"{where}: {twice!r} is in two state pairs; keep one")
    return tuple(pairs)


def state_pairs(
    *,
    declared: Sequence[Mapping[str, Any]] | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> tuple[StatePair, ...]:
    """The declared pairs when there are (an empty list declares a model without state), else
    the detected ones."""
    if declared is None:
        return detect_state_pairs(inputs, outputs)
    return match_state_pairs(declared, inputs=inputs, outputs=outputs)


class StreamState:
    """One state per stream name, for a model's state pairs.

    Thread-safe: the store is guarded by a lock, and :meth:`hold` gives each stream its own
    (re-entrant) lock, held around one window's ``feeds`` -> inference -> ``update`` so that
    two windows of one stream never read the same state; windows of different streams do not
    wait for each other. A stream's state lives until :meth:`reset`."""

    def __init__(self, pairs: Sequence[StatePair]) -> None:
        self.pairs = tuple(pairs)
        self._initial: dict[str, np.ndarray] = {}
        for pair in self.pairs:
            value = pair.initial_value()
            value.flags.writeable = False  # shared by every new stream
            self._initial[pair.input] = value
        self._states: dict[str, dict[str, np.ndarray]] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams that carry a state now."""
        with self._guard:
            return tuple(self._states)

    @contextmanager
    def hold(self, stream: str) -> Iterator[None]:
        """Hold ``stream``'s lock for one feeds -> inference -> update."""
        with self._guard:
            lock = self._locks.get(stream)
            if lock is None:
                lock = self._locks[stream] = threading.RLock()
        with lock:
            yield

    def get(self, stream: str) -> dict[str, np.ndarray]:
        """The state inputs ``stream`` would be fed now (read-only arrays)."""
        with self._guard:
            return dict(self._states.get(stream, self._initial))

    def feeds(self, stream: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` plus ``stream``'s state inputs (the initial value for a stream with no
        state yet). A state input already in ``feeds`` is kept as given."""
        with self._guard:
            state = self._states.get(stream, self._initial)
        return {**state, **feeds}

    def update(self, stream: str, outputs: Mapping[str, np.ndarray]) -> None:
        """Keep the state outputs of ``stream``'s last run (other outputs are ignored)."""
        new: dict[str, np.ndarray] = {}
        for pair in self.pairs:
            value = outputs.get(pair.output)
            if value is None:
                raise ModelError(
                    f"state output '{pair.output}' missing from the model's outputs; "
                    "the state pairs do not fit this model"
                )
            array = np.array(value, dtype=pair.dtype, copy=True)
            if array.shape != pair.shape:
                raise ModelError(
                    f"state output '{pair.output}' came back {list(array.shape)}, "
                    f"expected {list(pair.shape)} (input '{pair.input}')"
                )
            array.flags.writeable = False
            new[pair.input] = array
        with self._guard:
            self._states[stream] = new

    def reset(self, stream: str | None = None) -> None:
        """Forget ``stream``'s state (every stream's with None): its next window starts from the
        initial value. Waits for a window of that stream in flight."""
        if stream is None:
            for name in self.streams:
                self.reset(name)
            return
        with self.hold(stream), self._guard:
            self._states.pop(stream, None)


__all__ = [
    "NAMING_RULES",
    "StatePair",
    "StreamState",
    "detect_state_pairs",
    "match_state_pairs",
    "state_pairs",
]
