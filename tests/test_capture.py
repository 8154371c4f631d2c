"""Samples from the field (issue 15, point 2): capture policies, quotas, rate limits and the disk
bound; delivery over a real Mosquitto through agent and broker restarts, exactly once into the
dataset folder that edge-convert reads; the privacy switch; HTTP(S) PUT with a bearer token."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import numpy as np
import pytest

from converters.data import load_dataset
from edge_agent.config import CaptureSection, parse_config
from edge_agent.errors import ConfigError, DataError
from edge_agent.fleet import protocol
from edge_agent.fleet.capture import Sampler
from edge_agent.fleet.samples import HttpUploader, SampleStore
from edge_agent.io.source import Frame
from edgectl.collect import DatasetFolder, SampleAssembler, parse_since
from tests.broker import Broker, Collector
from tests.broker import broker_fixture as broker_fixture
from tests.fleet import AgentProcess, agent_config, checkout_env, edgectl, payloads, wait_until
from tests.fleet import fleet_env_fixture as fleet_env_fixture

DIGITS_INPUT = [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _frame(i: int, *, clock: Clock) -> Frame:
    rng = np.random.default_rng(i)
    data = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return Frame(index=i, data=data, capture_ts=clock(), capture_ns=0)


def _cls(score: float, cls: int = 3) -> dict[str, Any]:
    return {"kind": "classification", "class": cls, "label": str(cls), "score": score, "top": []}


def _sampler(tmp_path: Path, clock: Clock, **settings: Any) -> Sampler:
    store = SampleStore(tmp_path / "samples", max_bytes=settings.pop("max_bytes", 2**24))
    defaults = {"max_per_minute": 0, "max_per_hour": 0, "max_per_day": 0}
    sampler = Sampler(
        CaptureSection(**{**defaults, **settings}),
        store=store,
        device="cam-1",
        state_path=tmp_path / "capture.json",
        clock=clock,
        queue_size=1000,
    )
    sampler.start()
    return sampler


def _drain(sampler: Sampler) -> list[dict[str, Any]]:
    """Stop the encoder (it stores everything queued first) and read back every stored meta."""
    sampler.stop()
    metas = []
    for sample_id in sampler.store.ids():
        loaded = sampler.store.load(sample_id)
        assert loaded is not None
        metas.append(loaded[0])
    return metas


def test_every_policy_is_off_by_default_and_values_are_checked() -> None:
    assert not CaptureSection().enabled
    assert not parse_config({}).capture.enabled
    assert parse_config({"capture": {"random_every": 5}}).capture.enabled
    with pytest.raises(ConfigError, match=r"\[capture\] low_confidence = 1.5: must be between"):
        CaptureSection(low_confidence=1.5)
    with pytest.raises(ConfigError, match=r"upload_url = 'ftp://x': expected http"):
        CaptureSection(upload_url="ftp://x")
    with pytest.raises(ConfigError, match=r"token_file is set without upload_url"):
        CaptureSection(token_file="token")


def test_policies_pick_the_frames_they_name(tmp_path: Path) -> None:
    clock = Clock()
    sampler = _sampler(tmp_path, clock, low_confidence=0.5, near_threshold=0.8, near_margin=0.05)
    outputs = [_cls(0.3), _cls(0.9), _cls(0.78), _cls(0.99), {"kind": "classification",
               "error": "nan", "score": 0.1}]  # fmt: skip
    for i, out in enumerate(outputs):
        clock.now += 1
        sampler(_frame(i, clock=clock), out, {"name": "digits", "version": "1.0.0"}, None)
    metas = _drain(sampler)
    assert [(m["frame"], m["reasons"]) for m in metas] == [
        (0, ["low_confidence"]),
        (2, ["near_threshold"]),
    ]
    m = metas[0]
    assert m["kind"] == "jpeg" and m["shape"] == [48, 64, 3] and m["model"]["version"] == "1.0.0"
    assert m["output"]["score"] == 0.3 and m["device"] == "cam-1" and m["stream"] is None
    loaded = sampler.store.load(m["id"])
    assert loaded is not None and loaded[1][:2] == b"\xff\xd8"  # a JPEG
    for meta in metas:
        jsonschema.validate(meta, protocol.SCHEMAS["sample_meta"])

    # drift, while the monitor says so; random 1 in N; sensor windows as .npy
    drifting = {"on": False}
    clock2 = Clock()
    s2 = Sampler(
        CaptureSection(drift=True, random_every=4, max_per_minute=0, max_per_hour=0, max_per_day=0),
        store=SampleStore(tmp_path / "s2", max_bytes=2**24),
        device="cam-1",
        state_path=tmp_path / "c2.json",
        drifting=lambda: drifting["on"],
        clock=clock2,
        queue_size=100,
    )
    s2.start()
    window = Frame(data=np.ones((16, 3), np.float32), index=0, capture_ts=1.0, capture_ns=0)
    for i in range(8):
        drifting["on"] = i == 5
        clock2.now += 1
        s2(Frame(i, window.data * i, clock2(), 0), _cls(0.99), None, "mic")
    metas = _drain(s2)
    assert [(m["frame"], m["reasons"]) for m in metas] == [
        (3, ["random"]),
        (5, ["drift"]),
        (7, ["random"]),
    ]
    assert (
        metas[0]["kind"] == "npy" and metas[0]["shape"] == [16, 3] and metas[0]["stream"] == "mic"
    )

    # disagreement: the hook the shadow model calls (off unless configured)
    assert not s2.disagreement(
        frame=window, output=_cls(0.9), shadow_output=_cls(0.9, 4), model=None
    )
    s3 = _sampler(tmp_path / "s3", Clock(), disagreement=True)
    assert s3.disagreement(frame=window, output=_cls(0.9), shadow_output=_cls(0.8, 4), model=None)
    (meta,) = _drain(s3)
    assert meta["reasons"] == ["disagreement"] and meta["shadow_output"]["class"] == 4


def test_quotas_and_rate_limits_hold_and_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    limits = {"max_per_minute": 3, "max_per_hour": 5, "max_per_day": 7}
    sampler = _sampler(tmp_path, clock, random_every=1, class_quota=2, **limits)
    model = {"name": "m", "version": "1"}
    # one minute: 10 frames of class 1 and 10 of class 2 -> the class quota (2 each) lets 4
    # through, the per-minute limit 3 of them
    for i in range(20):
        clock.now += 1
        sampler(_frame(i, clock=clock), _cls(0.9, 1 + i % 2), model, None)
    assert sampler.stats.reasons["random"] == 3  # chosen (the encoder may still be storing)
    # later in the hour: classes 1 and 2 are used up for the day; class 3 and 4 bring the hour's
    # total to its limit of 5
    for i in range(20, 40):
        clock.now += 61
        sampler(_frame(i, clock=clock), _cls(0.9, 1 + i % 4), model, None)
    metas = _drain(sampler)
    assert len(metas) == 5
    per_class: dict[int, int] = {}
    for m in metas:
        per_class[m["output"]["class"]] = per_class.get(m["output"]["class"], 0) + 1
    assert max(per_class.values()) <= 2
    assert sampler.stats.rate_limited > 0 and sampler.stats.quota > 0

    # a restart (a new Sampler on the same state file): the day's count is kept, so after the
    # hour only 2 more fit in the day (7), whatever the classes
    clock.now += 3600
    again = Sampler(
        CaptureSection(random_every=1, class_quota=100, **limits),
        store=sampler.store, device="cam-1", state_path=tmp_path / "capture.json",
        clock=clock, queue_size=100,
    )  # fmt: skip
    again.start()
    for i in range(40, 60):
        clock.now += 61
        again(_frame(i, clock=clock), _cls(0.9, 100 + i), model, None)
    assert len(_drain(again)) == 7
    # a day later the window has moved on
    clock.now += 86400
    again = Sampler(
        CaptureSection(random_every=1, class_quota=100, **limits),
        store=sampler.store, device="cam-1", state_path=tmp_path / "capture.json",
        clock=clock, queue_size=100,
    )  # fmt: skip
    again.start()
    again(_frame(99, clock=clock), _cls(0.9, 1), model, None)
    assert len(_drain(again)) == 8


def test_the_store_stays_within_its_bound_oldest_first_and_its_disk_share(tmp_path: Path) -> None:
    clock = Clock()
    sampler = _sampler(tmp_path, clock, random_every=1, max_bytes=40_000)
    for i in range(30):
        clock.now += 1
        sampler(_frame(i, clock=clock), _cls(0.9), None, None)
    metas = _drain(sampler)
    store = sampler.store
    on_disk = sum(p.stat().st_size for p in store.directory.iterdir())
    assert on_disk <= 40_000 and store.size_bytes() == on_disk
    assert store.stats.evicted > 0 and store.stats.evicted + len(metas) == 30
    assert [m["frame"] for m in metas] == list(range(30 - len(metas), 30))  # the newest kept
    # never more than its share of the disk: a share so small that not one sample fits
    tiny = SampleStore(tmp_path / "tiny", max_bytes=2**30, disk_share=1e-12)
    assert tiny.bound() < 100
    assert not tiny.add(metas[0], b"x" * 1000) and len(tiny) == 0
    # an interrupted write (data without its meta) is removed at open; whole samples are kept
    (store.directory / "1800000000000000-abcdef.jpg").write_bytes(b"half")
    reopened = SampleStore(store.directory, max_bytes=40_000)
    assert (
        reopened.ids() == store.ids()
        and not (store.directory / "1800000000000000-abcdef.jpg").exists()
    )


def test_capture_off_stops_at_once_and_stays_off(tmp_path: Path) -> None:
    clock = Clock()
    sampler = _sampler(tmp_path, clock, random_every=1)
    sampler(_frame(0, clock=clock), _cls(0.9), None, None)
    wait_until(lambda: len(sampler.store) == 1, timeout=10, what="one sample stored")
    result = sampler.set_enabled(False, purge=True)
    assert result["enabled"] is False and result["purged"] == 1 and len(sampler.store) == 0
    for i in range(1, 5):
        sampler(_frame(i, clock=clock), _cls(0.9), None, None)
    assert _drain(sampler) == [] and sampler.stats.matched == 1  # the first frame only
    again = _sampler(tmp_path, clock, random_every=1)  # the switch is kept across a restart
    assert not again.enabled
    again(_frame(9, clock=clock), _cls(0.9), None, None)
    assert _drain(again) == []


def test_collected_folder_is_written_once_and_read_by_the_converter(tmp_path: Path) -> None:
    clock = Clock()
    sampler = _sampler(tmp_path, clock, random_every=1)
    for i in range(3):
        clock.now += 1
        img = np.full((8, 8, 3), 40 * i, np.uint8)
        sampler(
            Frame(data=img, index=i, capture_ts=clock(), capture_ns=0), _cls(0.9, i), None, None
        )
    metas = _drain(sampler)
    folder = DatasetFolder(tmp_path / "ds")
    asm = SampleAssembler(folder, since=clock() - 1.5)
    for meta in metas:
        _, data = sampler.store.load(meta["id"]) or ({}, b"")
        topics = protocol.Topics("cam-1")
        chunks = protocol.split_chunks(data, meta["chunk_size"])
        cleared = asm.handle(topics.sample_meta(meta["id"]), protocol.dumps(meta))
        for i, chunk in reversed(list(enumerate(chunks))):  # any order
            cleared += asm.handle(topics.sample_chunk(meta["id"], i), chunk)
        # sent again (a device resending after a lost PUBACK): not written twice, cleared again
        again = asm.handle(topics.sample_meta(meta["id"]), protocol.dumps(meta))
        if meta["capture_ts"] >= clock() - 1.5:
            assert cleared[0] == topics.sample_meta(meta["id"]) and len(cleared) == 1 + len(chunks)
            assert again == [topics.sample_meta(meta["id"])]
        else:
            assert cleared == [] and again == []  # older than --since: left on the broker
    assert asm.stats.written == 2 and asm.stats.older == 1 and asm.stats.duplicates == 2
    lines = (tmp_path / "ds" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [m["id"] for m in metas[1:]]
    assert all(r["label"] is None and (tmp_path / "ds" / r["file"]).is_file() for r in rows)
    # a crash mid-append leaves half a line: cut off when the folder is opened again
    with open(tmp_path / "ds" / "samples.jsonl", "ab") as fh:
        fh.write(b'{"id": "half')
    assert len(DatasetFolder(tmp_path / "ds").keys) == 2
    ds = load_dataset(tmp_path / "ds", input_specs=DIGITS_INPUT)
    assert len(ds) == 2 and ds.labels is None
    assert next(ds.batches())["input"].shape == (1, 1, 8, 8)
    # a person fills in the labels: --eval has them
    rows[0]["label"], rows[1]["label"] = 1, 2
    (tmp_path / "ds" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(tmp_path / "ds", input_specs=DIGITS_INPUT)
    assert ds.read_labels() is not None and ds.read_labels().tolist() == [1, 2]
    rows[0]["label"] = "one"
    (tmp_path / "ds" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"label = 'one': expected an integer class index"):
        load_dataset(tmp_path / "ds", input_specs=DIGITS_INPUT)
    assert parse_since("2026-12-01T10:30Z") == 1796121000.0
    assert parse_since("2h", now=10000.0) == 2800.0


class _PutHandler(http.server.BaseHTTPRequestHandler):
    store: ClassVar[dict[str, tuple[bytes, str | None]]] = {}

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != "Bearer s3cret":
            self.send_response(401)
        else:
            self.store[self.path] = (body, self.headers.get("Content-Type"))
            self.send_response(201)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_put_with_a_bearer_token_from_a_file(tmp_path: Path) -> None:
    clock = Clock()
    sampler = _sampler(tmp_path, clock, random_every=1)
    sampler(_frame(0, clock=clock), _cls(0.9), None, None)
    (meta,) = _drain(sampler)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PutHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/samples"
    try:
        wrong = HttpUploader(sampler.store, url=url, device="cam-1", token="nope")
        wrong.start()
        wait_until(lambda: wrong.last_error is not None, timeout=10, what="a refused upload")
        wrong.stop()
        assert "401" in str(wrong.last_error) and len(sampler.store) == 1  # kept for a retry
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        from edge_agent.fleet.mqtt import read_secret

        up = HttpUploader(
            sampler.store, url=url, device="cam-1", token=read_secret(str(token), what="token")
        )
        up.start()
        wait_until(lambda: len(sampler.store) == 0, timeout=10, what="the upload")
        up.stop()
    finally:
        server.shutdown()
        server.server_close()
    jpg = _PutHandler.store[f"/samples/cam-1/{meta['id']}.jpg"]
    assert jpg[1] == "image/jpeg" and jpg[0][:2] == b"\xff\xd8"
    assert json.loads(_PutHandler.store[f"/samples/cam-1/{meta['id']}.json"][0])["id"] == meta["id"]


# --- end to end: a real agent, a real broker, the real edgectl ---------------------------------


def _store_ids(state: Path) -> set[str]:
    directory = state / "samples"
    return {p.stem for p in directory.glob("*.json")} if directory.exists() else set()


@pytest.mark.slow
def test_samples_survive_agent_and_broker_restarts_and_arrive_exactly_once(
    tmp_path: Path, fleet_env: dict[str, Any]
) -> None:
    """Captured while the broker is down; an agent SIGKILLed mid-transfer; the broker restarted;
    then every sample is in the dataset folder once. The day's limit (kept across restarts)
    means the later runs capture nothing new, so the expected set is known."""
    broker = Broker(tmp_path / "broker")
    state = tmp_path / "state"
    cfg = agent_config(
        broker=broker.url, device="cam-s", state_dir=state,
        model=fleet_env["root"] / "digits-1.0.0.edgebundle", source=str(fleet_env["video"]),
        keys=fleet_env["pub"], pace="native",
        extra="[capture]\nrandom_every = 10\nmax_per_day = 12\nchunk_kb = 1\n",
    ).replace("flush_timeout = 20", "flush_timeout = 1")  # fmt: skip
    # 1. no broker: the samples wait in the store, across the agent's exit
    first = AgentProcess(tmp_path, cfg, name="first").start()
    assert first.wait(60) == 0, first.text()
    captured = _store_ids(state)
    assert 1 <= len(captured) <= 12, first.text()
    broker.start()
    try:
        # 2. the broker is back: delivery starts; the agent is killed in the middle
        second = AgentProcess(tmp_path, cfg, name="second").start()
        wait_until(lambda: len(_store_ids(state)) < len(captured), timeout=60,
                   what="a first sample delivered")  # fmt: skip
        second.kill()
        assert _store_ids(state) <= captured  # nothing new: the day's limit held
        # 3. the broker restarts (its retained chunks persist); a third agent finishes the job
        broker.restart()
        third = AgentProcess(tmp_path, cfg, name="third").start()
        wait_until(lambda: not _store_ids(state), timeout=60, what="every sample delivered")
        third.stop()
        # 4. collect: every sample once
        out = tmp_path / "dataset"
        done = edgectl("collect", "--out", str(out), "--device", "cam-s", "--idle", "3",
                       broker=broker.url)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(captured), done.stdout
        assert all(r["reasons"] == ["random"] and r["model"]["name"] == "digits" for r in rows)
        assert all((out / r["file"]).is_file() for r in rows)
        # again: nothing new (the collected samples were cleared from the broker)
        again = edgectl("collect", "--out", str(out), "--idle", "2", broker=broker.url)
        assert again.returncode == 0 and again.stdout.startswith("0 samples written"), again
        assert len((out / "samples.jsonl").read_text().splitlines()) == len(captured)
        ds = load_dataset(out, input_specs=DIGITS_INPUT)
        assert len(ds) == len(captured)
    finally:
        broker.stop()


@pytest.mark.slow
def test_capture_off_over_mqtt_stops_at_once_and_purges(
    tmp_path: Path, broker: Broker, fleet_env: dict[str, Any]
) -> None:
    state = tmp_path / "state"
    cfg = agent_config(
        broker=broker.url, device="cam-p", state_dir=state,
        model=fleet_env["root"] / "digits-1.0.0.edgebundle",
        source="synthetic:?width=64&height=64&fps=30&live=1", keys=fleet_env["pub"],
        extra="[capture]\nrandom_every = 3\nmax_per_minute = 0\nmax_per_hour = 0\n"
        "max_per_day = 0\n",
    )  # fmt: skip

    def capture(msgs: list[Any]) -> list[dict[str, Any]]:
        return [t["capture"] | {"results": t["pipeline"]["results"]}
                for t in payloads(msgs, "/telemetry") if "capture" in t]  # fmt: skip

    with Collector(broker, ["edge/cam-p/telemetry"]) as sub, AgentProcess(tmp_path, cfg) as agent:
        sub.wait_for(lambda m: any(c["captured"] > 0 for c in capture(m)), timeout=60)
        off = edgectl("capture", "--device", "cam-p", "--off", "--purge", broker=broker.url)
        assert off.returncode == 0, off.stderr
        result = json.loads(off.stdout)
        assert result["enabled"] is False and result["waiting"] == 0
        assert json.loads((state / "capture.json").read_text())["enabled"] is False
        # the agent goes on serving; from the switch on, no frame is even considered
        sub.clear()
        first = capture(sub.wait_for(lambda m: len(capture(m)) >= 1, timeout=30))[0]
        assert first["enabled"] is False
        later = capture(sub.wait_for(
            lambda m: capture(m)[-1:] and capture(m)[-1]["results"] >= first["results"] + 30,
            timeout=30,
        ))[-1]  # fmt: skip
        assert later["matched"] == first["matched"] and later["captured"] == first["captured"]
        assert not _store_ids(state)
        agent.stop()
    # a restart keeps it off; --on turns it back on
    with AgentProcess(tmp_path, cfg, name="again") as agent:
        wait_until(lambda: "capture: off" in agent.text(), timeout=60, what="capture off")
        on = edgectl("capture", "--device", "cam-p", "--on", broker=broker.url)
        assert on.returncode == 0 and json.loads(on.stdout)["enabled"] is True, on.stderr
        wait_until(lambda: bool(_store_ids(state)) or "capture: on" in agent.text(),
                   timeout=30, what="capture again")  # fmt: skip


def test_checkout_env_puts_this_checkout_first() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import edge_agent; print(edge_agent.__file__)"],
        capture_output=True, text=True, env=checkout_env(), cwd="/", check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(
        Path(__file__).resolve().parents[1] / "edge_agent" / "__init__.py"
    )


def test_an_evicted_sample_half_sent_leaves_nothing_retained(tmp_path: Path) -> None:
    """A sample evicted (or purged) while its chunks were going out: the outbox clears the
    chunks already on the broker with empty retained payloads (no meta will ever point to
    them), then goes on with the next sample; a deferred clear is sent again."""
    from edge_agent.fleet import protocol
    from edge_agent.fleet.samples import SampleOutbox, SampleStore

    store = SampleStore(tmp_path / "samples", max_bytes=2**20)
    topics = protocol.Topics("cam-1")

    def add(n: int) -> str:
        data = bytes([n]) * 5000
        sample_id = f"{1_800_000_000_000_000 + n:016d}-abcdef"
        meta = protocol.sample_meta_payload(
            device="cam-1", sample_id=sample_id, kind="npy", reasons=["random"],
            capture_ts=1.8e9, stream=None, frame=n, model=None, output={}, data=data,
            chunk_size=1024, shape=[5000],
        )  # fmt: skip
        assert store.add(meta, data)
        return sample_id

    first, second = add(1), add(2)
    box = SampleOutbox(store, topics)
    sent = box.take(2)
    assert [k for k, _, _ in sent] == [(first, 0), (first, 1)]
    for key, _, _ in sent:
        box.acked(key)
    assert store.progress(first) == 2
    store.remove(first, delivered=False)  # evicted (or purged) before its meta went out
    out = box.take(2)
    assert {(k, t, p) for k, t, p in out} == {
        (("clear", first, i), topics.sample_chunk(first, i), b"") for i in (0, 1)
    }
    box.retry(out[0][0])  # the broker deferred one: it goes again
    box.acked(out[1][0])
    again = box.take(2)
    assert again[0] == out[0] and again[1][0] == (second, 0)
    box.acked(again[0][0])
    assert box.cleared == 2
    assert all(k[0] == second for k, _, _ in box.take(10))  # nothing more to clear
