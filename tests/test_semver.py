"""Version precedence per semver.org, and what the device's anti-rollback floor makes of it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edge_agent.common.semver import version_key
from edge_agent.fleet.store import ModelStore

#: semver.org 2.0.0, section 11: each lower than the next
SPEC_ORDER = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "2.0.0",
    "2.1.0",
    "2.1.1",
]


def test_the_spec_order() -> None:
    shuffled = SPEC_ORDER[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=version_key) == SPEC_ORDER
    for low, high in zip(SPEC_ORDER, SPEC_ORDER[1:]):
        assert version_key(low) < version_key(high), (low, high)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1.0.0+20130313144700", "1.0.0"),  # build metadata is ignored
        ("1.0.0-beta+exp.sha.5114f85", "1.0.0-beta"),
        ("1.2", "1.2.0"),
        ("v1.2.0", "1.2.0"),
    ],
)
def test_equal_precedence(a: str, b: str) -> None:
    assert version_key(a) == version_key(b)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("1.2.9", "1.2.10"),  # numbers, not text
        ("1.9.0", "1.10.0"),
        ("1.0.0-2", "1.0.0-10"),  # numeric identifiers numerically
        ("1.0.0-9", "1.0.0-a"),  # numbers below words
        ("1.0.0-rc.1", "1.0.0"),  # a pre-release below its release
        ("0.9.9", "1.0.0-alpha"),
    ],
)
def test_lower_precedence(low: str, high: str) -> None:
    assert version_key(low) < version_key(high)


def test_the_floor_follows_semver_so_a_release_after_its_candidate_is_no_downgrade(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path)
    store.commit({"version": "1.0.0-rc.1", "sha256": "a" * 64})
    assert store.floor == "1.0.0-rc.1"
    assert not version_key("1.0.0") < version_key(store.floor)  # the updater's downgrade test
    store.commit({"version": "1.0.0", "sha256": "b" * 64})
    assert store.floor == "1.0.0"
    store.commit({"version": "1.0.0-rc.2", "sha256": "c" * 64})  # an explicit rollback below it
    assert store.floor == "1.0.0"  # the floor never goes down
    assert version_key("1.0.0-rc.2") < version_key(store.floor)
