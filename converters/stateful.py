"""Streaming models in the converter: windows fed in sequence, each model carrying its own state.

A model with state pairs (:mod:`edge_agent.model.state`: an input that takes the state, an output
that returns the next one) is validated the way the device runs it. The samples of the
calibration and evaluation data (the usual ``.npy`` / ``.npz`` layouts, holding the model's
other inputs only) are the windows of one stream, in order. Validation runs every window in
turn through each model, and each model feeds its own state output back (the float reference
its own, the converted model its own), so quantization error that builds up in the state shows
up in the fidelity, measured over the whole stream rather than window by window
(:func:`run_sequence`). Calibration takes the state inputs from the float model's real states
along the calibration stream (:func:`with_states`), not zeros: the ranges a state reaches after
a few seconds of speech are what int8 must hold.

The device's code decides what a state pair is (one rule on both sides).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from converters.data import Dataset, Subset, _ArrayRows, evenly
from converters.validate import Batches, Progress
from edge_agent.errors import ModelError, UnsupportedModelError, first_line
from edge_agent.model.runtimes import TensorSpec
from edge_agent.model.state import StatePair, detect_state_pairs


def _specs(specs: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    return [
        TensorSpec(name=str(s["name"]), shape=tuple(s["shape"]), dtype=str(s["dtype"]))
        for s in specs
    ]


def state_pairs_of(
    inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]
) -> tuple[StatePair, ...]:
    """The state pairs of a model described by ``{name, shape, dtype}`` dicts
    (:func:`converters.canonical.tensor_spec`), found as the device finds them."""
    return detect_state_pairs(_specs(inputs), _specs(outputs))


def data_inputs(
    inputs: Sequence[Mapping[str, Any]], pairs: Sequence[StatePair]
) -> list[Mapping[str, Any]]:
    """The inputs the data feeds: every input but the state inputs."""
    state = {p.input for p in pairs}
    return [s for s in inputs if str(s["name"]) not in state]


def check_batch(fixed_batch: int | None, pairs: Sequence[StatePair]) -> None:
    """A streaming model runs one window of one stream at a time: a fixed batch > 1 would be
    several streams in one state, which the data cannot say."""
    if pairs and fixed_batch not in (None, 1):
        raise UnsupportedModelError(
            f"a streaming model (state {pairs[0].input} -> {pairs[0].output}) with a fixed batch "
            f"of {fixed_batch}: it is validated one window at a time; export it with batch 1"
        )


def initial_feeds(pairs: Sequence[StatePair]) -> dict[str, np.ndarray]:
    """Every state input at its initial value."""
    return {p.input: p.initial_value() for p in pairs}


def _windows(feeds: Iterable[Mapping[str, np.ndarray]]) -> Iterable[dict[str, np.ndarray]]:
    """Each feed's samples one at a time (batch of 1), in order."""
    for feed in feeds:
        count = int(next(iter(feed.values())).shape[0])
        for j in range(count):
            yield {name: x[j : j + 1] for name, x in feed.items()}


def _steps(
    session: Any, feeds: Iterable[Mapping[str, np.ndarray]], pairs: Sequence[StatePair]
) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Every window of ``feeds`` through ``session`` in order, from the initial state, each
    run's state outputs fed into the next: yields (the state inputs fed, the outputs)."""
    names = [o.name for o in session.get_outputs()]
    index = {name: i for i, name in enumerate(names)}
    missing = [p.output for p in pairs if p.output not in index]
    if missing:
        raise ModelError(f"state output '{missing[0]}' is not an output of the model")
    state = initial_feeds(pairs)
    for window in _windows(feeds):
        try:
            outs = session.run(names, {**window, **state})
        except Exception as exc:
            raise ModelError(f"inference failed: {first_line(exc)}") from exc
        yield state, outs
        state = {
            p.input: np.asarray(outs[index[p.output]], dtype=p.dtype).reshape(p.shape)
            for p in pairs
        }


def run_sequence(
    session: Any,
    feeds: Iterable[Mapping[str, np.ndarray]],
    pairs: Sequence[StatePair],
    *,
    progress: Progress | None = None,
) -> Batches:
    """Run every window of ``feeds`` (the data inputs, in stream order) through ``session``
    one at a time, from the initial state, feeding each run's state outputs back into the next.
    Returns each output's arrays, one per window (state outputs included), as
    :func:`converters.validate.run_all` does."""
    chunks: Batches = [[] for _ in session.get_outputs()]
    for _state, outs in _steps(session, feeds, pairs):
        for i, out in enumerate(outs):
            out = np.asarray(out)
            chunks[i].append(out if out.ndim else out[None])
        if progress is not None:
            progress.update()
    return chunks


class _StateRows:
    """The states fed at some windows, as the rows of a :class:`converters.data.Dataset`: rows
    ``start:stop`` concatenated along the state's batch axis (the first of size 1: axis 1 for
    Silero's ``[2, 1, 128]``), so one row is the state exactly as the model takes it."""

    def __init__(self, states: Sequence[np.ndarray]) -> None:
        self.states = list(states)
        shape = self.states[0].shape if self.states else ()
        self.axis = next((a for a, d in enumerate(shape) if d == 1), 0)

    def __len__(self) -> int:
        return len(self.states)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate(self.states[start:stop], axis=self.axis)


def with_states(
    subset: Subset, session: Any, pairs: Sequence[StatePair], *, keep: int, batch: int = 1
) -> Subset:
    """Samples for calibration: ``keep`` windows of ``subset`` evenly spread, each with the
    state the float model (``session``) carried into it, running the whole of ``subset`` in
    order from the initial state (only the picked windows' states are kept). An in-memory
    subset whose feeds hold every model input."""
    picks = evenly(range(len(subset)), keep)
    wanted = set(picks)
    fed: dict[int, dict[str, np.ndarray]] = {}
    for i, (state, _outs) in enumerate(_steps(session, subset.batches(batch=batch), pairs)):
        if i in wanted:
            fed[i] = state
    data = subset.ds.read_rows([subset.indices[i] for i in picks])
    inputs: dict[str, Any] = {name: _ArrayRows(x) for name, x in data.items()}
    for pair in pairs:
        inputs[pair.input] = _StateRows([fed[i][pair.input] for i in picks])
    ds = Dataset(
        inputs=inputs,
        labels=None,
        description=f"{subset.ds.description} (in sequence: the float model's states along "
        f"{len(subset)} windows)",
    )
    return Subset(ds, range(len(picks)))


def hide_state(
    outputs: Sequence[np.ndarray | None], names: Sequence[str], pairs: Sequence[StatePair]
) -> list[np.ndarray | None]:
    """The outputs with each state output as None: what the task is judged on."""
    state = {p.output for p in pairs}
    return [None if name in state else out for out, name in zip(outputs, names)]


__all__ = [
    "check_batch",
    "data_inputs",
    "hide_state",
    "initial_feeds",
    "run_sequence",
    "state_pairs_of",
    "with_states",
]
