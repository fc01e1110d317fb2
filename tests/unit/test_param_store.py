"""Parameter store: format round trips, atomic commits, the write lock, crashes."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore

import dasktrain.params as dtp
from dasktrain.errors import StoreError, StoreLockedError, StoreNotFoundError
from dasktrain.params import (
    LOCK_FILENAME,
    ParamStore,
    decode_meta,
    encode_meta,
)

PACKAGE_PARENT = Path(dtp.__file__).absolute().parents[2]


def _params(step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((7, 3), float(step)),
        "b": np.array(float(step)),
        "emb": np.full((40, 2), float(step), dtype=np.float32),
    }


def _opt(step: int) -> dict[str, np.ndarray]:
    return {
        "adam.count": np.array(step, dtype=np.int64),
        "adam.mu.w": np.full((7, 3), -float(step)),
        "adam.flag": np.array([True, False]),
    }


def _assert_version(store: ParamStore, step: int) -> None:
    version = store.read(step)
    assert version.step == step
    assert sorted(version.params) == ["b", "emb", "w"]
    for name, value in version.params.items():
        assert value.dtype == np.float64, name
        assert np.all(value == step), name
    assert version.params["b"].shape == ()
    assert version.opt_state["adam.count"].dtype == np.int64
    assert version.opt_state["adam.count"].shape == ()
    assert int(version.opt_state["adam.count"]) == step
    assert np.all(version.opt_state["adam.mu.w"] == -step)


def _version_dirs(path: Path) -> list[str]:
    return sorted(
        (p.name for p in (path / "versions").iterdir() if p.is_dir()), key=int
    )


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "run.zarr"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock_file(path: Path, *, host: str, pid: int) -> None:
    (path / LOCK_FILENAME).write_text(
        json.dumps(
            {
                "host": host,
                "pid": pid,
                "owner": "old trainer",
                "token": "old-token",
                "created": "2020-01-01T00:00:00+00:00",
            }
        )
    )


# ------------------------------------------------------------ round trips


def test_round_trip_with_api_and_plain_zarr(store_path: Path) -> None:
    meta = {
        "model": {"name": "LogisticRegression", "l2": 1e-4},
        "history": [
            {"step": 1, "loss": float("nan"), "grad_norm": float("inf")},
            {"step": 2, "loss": 0.5, "grad_norm": -float("inf")},
        ],
        "cursor": [3, 4],
        "seed": 0,
        "done": False,
        "note": None,
    }
    store = ParamStore.create(store_path, keep_versions=3, meta={"model": "x"})
    assert store.committed is None
    assert store.versions == []
    assert store.meta == {"model": "x"}
    params = {"w": np.arange(6.0).reshape(2, 3), "b": np.array(-1.5)}
    opt = {"adam.count": np.array(4, dtype=np.int64), "adam.nu.w": np.ones((2, 3))}
    with store.lock(owner="test"):
        store.commit(1, params, opt, meta)

    reopened = ParamStore.open(store_path)
    assert reopened.committed == 1
    assert reopened.versions == [1]
    assert reopened.keep_versions == 3
    version = reopened.read()
    assert version.step == 1
    np.testing.assert_array_equal(version.params["w"], params["w"])
    assert version.params["b"].shape == ()
    assert float(version.params["b"]) == -1.5
    assert version.opt_state["adam.count"].dtype == np.int64
    assert int(version.opt_state["adam.count"]) == 4
    got = reopened.meta
    assert math.isnan(got["history"][0]["loss"])
    assert got["history"][0]["grad_norm"] == math.inf
    assert got["history"][1]["grad_norm"] == -math.inf
    assert json.dumps(got) == json.dumps(meta)

    # meta is a deep copy
    got["model"]["l2"] = 1.0
    assert reopened.meta["model"]["l2"] == 1e-4

    # Plain zarr sees the same data; the root zarr.json is strict JSON.
    raw = (store_path / "zarr.json").read_text()

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads(raw, parse_constant=no_constants)
    group = zarr.open_group(store_path, mode="r")
    attrs = group.attrs["dasktrain"]
    assert attrs["format"] == "dasktrain.params"
    assert attrs["format_version"] == 1
    assert attrs["committed"] == 1
    assert attrs["versions"] == [1]
    assert attrs["meta"]["history"][0]["loss"] == {"__float__": "NaN"}
    assert decode_meta(attrs["meta"])["history"][1]["loss"] == 0.5
    np.testing.assert_array_equal(group["versions/1/params/w"][...], params["w"])
    assert group["versions/1/opt/adam.count"][...] == 4
    assert group["versions/1/opt/adam.count"].dtype == np.int64


def test_non_finite_parameters_are_stored(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    values = np.array([np.nan, np.inf, -np.inf, 1.0])
    with store.lock():
        store.commit(0, {"w": values}, {}, {})
    np.testing.assert_array_equal(
        ParamStore.open(store_path).read().params["w"], values
    )


def test_float32_parameters_are_stored_as_float64(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    with store.lock():
        store.commit(0, {"w": np.ones(3, dtype=np.float32)}, {}, {})
    assert store.read().params["w"].dtype == np.float64


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=5).filter(lambda k: k != "__float__"), children, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _json_values, max_size=4))
def test_meta_encoding_round_trips(meta: dict[str, Any]) -> None:
    if "__float__" in meta:
        return
    encoded = encode_meta(meta)
    text = json.dumps(encoded, allow_nan=False)
    decoded = decode_meta(json.loads(text))
    assert json.dumps(decoded) == json.dumps(meta)


# ------------------------------------------------------------ versions


def test_keeps_last_k_versions(store_path: Path) -> None:
    store = ParamStore.create(store_path, keep_versions=2)
    with store.lock():
        for step in (1, 2, 5, 6, 9):
            store.commit(step, _params(step), _opt(step), {"step": step})
    assert store.committed == 9
    assert store.versions == [6, 9]
    assert _version_dirs(store_path) == ["6", "9"]
    reopened = ParamStore.open(store_path)
    assert reopened.versions == [6, 9]
    _assert_version(reopened, 6)
    _assert_version(reopened, 9)
    with pytest.raises(StoreError, match="no committed version 5"):
        reopened.read(5)


def test_readers_see_new_commits_after_refresh(store_path: Path) -> None:
    writer = ParamStore.create(store_path, keep_versions=1)
    with writer.lock():
        writer.commit(1, _params(1), _opt(1), {"step": 1})
        reader = ParamStore.open(store_path)
        writer.commit(2, _params(2), _opt(2), {"step": 2})
    assert reader.committed == 1
    assert reader.meta == {"step": 1}
    with pytest.raises(StoreError, match="deleted"):
        reader.read()  # version 1 was dropped (keep_versions=1)
    reader.refresh()
    assert reader.committed == 2
    _assert_version(reader, 2)


def test_commit_writes_arrays_then_root_once_then_deletes(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ParamStore.create(store_path, keep_versions=1)
    with store.lock():
        store.commit(1, _params(1), _opt(1), {})
        events: list[str] = []
        original_set = LocalStore.set
        original_delete = dtp.store._Location.delete

        async def recording_set(self: LocalStore, key: str, value: Any) -> None:
            events.append(f"set {key}")
            await original_set(self, key, value)

        def recording_delete(self: Any, key: str) -> None:
            events.append(f"delete {key}")
            original_delete(self, key)

        monkeypatch.setattr(LocalStore, "set", recording_set)
        monkeypatch.setattr(dtp.store._Location, "delete", recording_delete)
        store.commit(2, _params(2), _opt(2), {})
    root_writes = [i for i, e in enumerate(events) if e == "set zarr.json"]
    assert len(root_writes) == 1
    (root_write,) = root_writes
    before, after = events[:root_write], events[root_write + 1 :]
    assert all(e.startswith("set versions/2/") for e in before), before
    for name in ("params/w", "params/b", "params/emb", "opt/adam.count"):
        assert f"set versions/2/{name}/zarr.json" in before
    assert after == ["delete versions/1"]


# ------------------------------------------------------------ failures


def _small(step: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {"w": np.full((7, 3), float(step)), "b": np.array(float(step))}
    return params, {"adam.count": np.array(step, dtype=np.int64)}


def _assert_small(store: ParamStore, step: int) -> None:
    version = store.read(step)
    assert sorted(version.params) == ["b", "w"]
    assert all(np.all(value == step) for value in version.params.values())
    assert int(version.opt_state["adam.count"]) == step


def _count_store_writes(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    store = ParamStore.create(path)
    calls = 0
    original_set = LocalStore.set

    async def counting_set(self: LocalStore, key: str, value: Any) -> None:
        nonlocal calls
        calls += 1
        await original_set(self, key, value)

    with store.lock():
        store.commit(1, *_small(1), {})
        with monkeypatch.context() as patch:
            patch.setattr(LocalStore, "set", counting_set)
            store.commit(2, *_small(2), {})
    return calls


def test_failed_write_at_any_point_keeps_committed_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_writes = _count_store_writes(tmp_path / "count.zarr", monkeypatch)
    assert n_writes >= 10  # 3 groups + 3 arrays x (metadata + chunk) + root
    original_set = LocalStore.set
    path = tmp_path / "fail.zarr"
    store = ParamStore.create(path, keep_versions=2)
    store.lock()
    store.commit(0, *_small(0), {"step": 0, "loss": float("nan")})
    for fail_at in range(n_writes):
        good, bad = fail_at, fail_at + 1
        calls = 0
        failed_key = ""

        async def failing_set(
            self: LocalStore, key: str, value: Any, fail_at: int = fail_at
        ) -> None:
            nonlocal calls, failed_key
            calls += 1
            if calls == fail_at + 1:
                failed_key = key
                raise OSError(errno.ENOSPC, "No space left on device")
            await original_set(self, key, value)

        with monkeypatch.context() as patch:
            patch.setattr(LocalStore, "set", failing_set)
            with pytest.raises(StoreError) as info:
                store.commit(bad, *_small(bad), {"step": bad})
        message = str(info.value)
        assert str(path) in message
        assert "No space left" in message
        if failed_key == "zarr.json":
            assert "root attributes" in message
        else:
            node = failed_key.split("/c/")[0].removesuffix("/zarr.json")
            node = node.removesuffix("/c")
            kind = "array" if node.count("/") == 3 else "group"
            assert f"{kind} {node} " in message, (failed_key, message)
        assert isinstance(info.value.__cause__, OSError)

        for reader in (store, ParamStore.open(path)):
            assert reader.committed == good
            assert reader.meta["step"] == good
            _assert_small(reader, good)
        assert _version_dirs(path) == [str(v) for v in store.versions]

        store.commit(bad, *_small(bad), {"step": bad})  # the next commit works
        _assert_small(ParamStore.open(path), bad)
    store.release()


def test_leftover_version_is_ignored_and_cleaned(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    with store.lock():
        store.commit(1, _params(1), _opt(1), {"step": 1})
    versions = store_path / "versions"
    shutil.copytree(versions / "1", versions / "7")
    shutil.copytree(versions / "1", versions / "3")
    (versions / "zarr.abc123.partial").write_text("{")
    (store_path / "zarr.def456.partial").write_text("{")

    reader = ParamStore.open(store_path)
    assert reader.committed == 1
    assert reader.versions == [1]
    _assert_version(reader, 1)
    for step in (3, 7):
        with pytest.raises(StoreError, match=f"no committed version {step}"):
            reader.read(step)

    with pytest.raises(StoreError, match="write lock"):
        reader.cleanup()
    with reader.lock():
        removed = reader.cleanup()
    assert removed == [
        "versions/3",
        "versions/7",
        "versions/zarr.abc123.partial",
        "zarr.def456.partial",
    ]
    assert _version_dirs(store_path) == ["1"]
    assert sorted(p.name for p in versions.iterdir()) == ["1", "zarr.json"]
    _assert_version(ParamStore.open(store_path), 1)


def test_commit_replaces_leftover_of_same_step(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    with store.lock():
        store.commit(1, _params(1), _opt(1), {})
        leftover = zarr.open_group(store_path / "versions", mode="r+")
        stale = leftover.create_group("2").create_group("params")
        stale.create_array("stale", shape=(2,), dtype="float64")[...] = 9.0
        store.commit(2, _params(2), _opt(2), {})
    version = ParamStore.open(store_path).read()
    assert "stale" not in version.params
    _assert_version(ParamStore.open(store_path), 2)


def test_commit_refused_without_lock_or_for_old_step(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    with pytest.raises(StoreError, match="write lock"):
        store.commit(1, _params(1), _opt(1), {})
    assert _version_dirs(store_path) == []
    with store.lock():
        store.commit(5, _params(5), _opt(5), {"step": 5})
        for step in (5, 4):
            with pytest.raises(StoreError, match="already committed"):
                store.commit(step, _params(step), _opt(step), {})
    with pytest.raises(StoreError, match="write lock"):
        store.commit(6, _params(6), _opt(6), {})
    assert ParamStore.open(store_path).committed == 5
    assert _version_dirs(store_path) == ["5"]


def test_update_meta_keeps_the_committed_arrays(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    with pytest.raises(StoreError, match="write lock"):
        store.update_meta({"a": 1})
    with store.lock():
        with pytest.raises(StoreError, match="nothing is committed"):
            store.update_meta({"a": 1})
        store.commit(3, _params(3), _opt(3), {"epoch": 0})
        store.update_meta({"epoch": 1})
    reopened = ParamStore.open(store_path)
    assert reopened.committed == 3 and reopened.meta == {"epoch": 1}
    _assert_version(reopened, 3)
    assert _version_dirs(store_path) == ["3"]


@pytest.mark.parametrize(
    ("params", "opt", "meta", "error", "pattern"),
    [
        ({"w": [1.0, 2.0]}, {}, {}, TypeError, "'w' must be a numpy array"),
        ({"w": np.array([object()])}, {}, {}, TypeError, "'w' has dtype object"),
        ({"w": np.arange(3)}, {}, {}, TypeError, "floating point"),
        ({"w": np.ones(2)}, {"s": np.array(["a"])}, {}, TypeError, "'s' has dtype"),
        ({"": np.ones(2)}, {}, {}, ValueError, "must not be empty"),
        ({"a/b": np.ones(2)}, {}, {}, ValueError, "'a/b' must not contain"),
        ({".w": np.ones(2)}, {}, {}, ValueError, "'.w' must not start"),
        ({"w": np.ones(2)}, {"__x": np.ones(1)}, {}, ValueError, "'__x'"),
        ({"w": np.ones(2)}, {}, {"cfg": {"s": {1, 2}}}, TypeError, r"meta\['cfg'\]"),
        ({"w": np.ones(2)}, {}, {"h": [1, object()]}, TypeError, r"meta\['h'\]\[1\]"),
        ({"w": np.ones(2)}, {}, {"cfg": {3: 1}}, TypeError, "key 3"),
        ({"w": np.ones(2)}, {}, {"x": {"__float__": 1}}, ValueError, "reserved"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    store_path: Path,
    params: Any,
    opt: Any,
    meta: Any,
    error: type[Exception],
    pattern: str,
) -> None:
    store = ParamStore.create(store_path)
    with store.lock():
        store.commit(1, _params(1), _opt(1), {"step": 1})
        with pytest.raises(error, match=pattern):
            store.commit(2, params, opt, meta)
    assert _version_dirs(store_path) == ["1"]
    reopened = ParamStore.open(store_path)
    assert reopened.committed == 1
    assert reopened.meta == {"step": 1}


# ------------------------------------------------------------ the lock


def test_second_lock_is_refused_naming_the_holder(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    first = store.lock(owner="trainer-A")
    other = ParamStore.open(store_path)
    with pytest.raises(StoreLockedError) as info:
        other.lock(owner="trainer-B")
    message = str(info.value)
    assert str(store_path) in message
    assert socket.gethostname() in message
    assert f"pid {os.getpid()}" in message
    assert "trainer-A" in message
    assert first.info.created in message
    with pytest.raises(StoreLockedError):
        store.lock()  # not re-entrant either
    with pytest.raises(StoreError, match="write lock"):
        other.commit(1, _params(1), _opt(1), {})
    assert other.lock_holder() == first.info

    store.release()
    store.release()  # harmless
    first.release()  # harmless
    assert not (store_path / LOCK_FILENAME).exists()
    with other.lock(owner="trainer-B") as second:
        assert second.held
        other.commit(1, _params(1), _opt(1), {})
    assert not second.held
    assert not (store_path / LOCK_FILENAME).exists()


def test_release_never_removes_a_successors_lock(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    lock = store.lock(owner="old")
    assert ParamStore.break_lock(store_path) == lock.info
    other = ParamStore.open(store_path)
    successor = other.lock(owner="new")
    with pytest.raises(StoreLockedError, match="broken or taken over"):
        store.commit(1, _params(1), _opt(1), {})
    lock.release()
    assert successor.held
    other.commit(1, _params(1), _opt(1), {})
    other.release()


def test_stale_lock_on_this_host_is_taken_over(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ParamStore.create(store_path)
    _write_lock_file(store_path, host=socket.gethostname(), pid=_dead_pid())
    with caplog.at_level(logging.WARNING, logger="dasktrain.params"):
        lock = store.lock(owner="new")
    assert "took over the stale write lock" in caplog.text
    assert "old trainer" in caplog.text
    assert lock.held
    content = json.loads((store_path / LOCK_FILENAME).read_text())
    assert content["pid"] == os.getpid()
    assert content["owner"] == "new"
    store.commit(1, _params(1), _opt(1), {})
    store.release()


def test_lock_of_a_reused_pid_is_stale(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    # Our own pid, but the lock predates this process: the pid was reused.
    _write_lock_file(store_path, host=socket.gethostname(), pid=os.getpid())
    with store.lock():
        store.commit(1, _params(1), _opt(1), {})


def test_lock_from_another_host_is_never_broken_automatically(
    store_path: Path,
) -> None:
    store = ParamStore.create(store_path)
    _write_lock_file(store_path, host="elsewhere.invalid", pid=_dead_pid())
    with pytest.raises(StoreLockedError) as info:
        store.lock()
    message = str(info.value)
    assert "elsewhere.invalid" in message
    assert "old trainer" in message
    assert "2020-01-01" in message
    assert "break_lock" in message
    assert (store_path / LOCK_FILENAME).exists()

    broken = ParamStore.break_lock(store_path)
    assert broken is not None
    assert broken.host == "elsewhere.invalid"
    assert ParamStore.break_lock(store_path) is None
    with store.lock():
        store.commit(1, _params(1), _opt(1), {})


def test_unreadable_lock_file_is_refused(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    (store_path / LOCK_FILENAME).write_text("")
    with pytest.raises(StoreLockedError, match="unreadable"):
        store.lock()


# ------------------------------------------------------------ open / create


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"missing\.zarr"):
        ParamStore.open(tmp_path / "missing.zarr")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    a_file = tmp_path / "file.zarr"
    a_file.write_text("x")

    dataset = tmp_path / "dataset.zarr"
    group = zarr.create_group(
        store=dataset, attributes={"dasktrain": {"format": "dasktrain.dataset"}}
    )
    group.create_array("X", shape=(4, 2), dtype="float32")
    bare = tmp_path / "bare.zarr"
    zarr.create_group(store=bare)
    an_array = tmp_path / "array.zarr"
    zarr.create_array(store=an_array, shape=(3,), dtype="float64")

    garbled = tmp_path / "garbled.zarr"
    ParamStore.create(garbled)
    (garbled / "zarr.json").write_text('{"attributes": {"dasktrain": ')

    future = tmp_path / "future.zarr"
    ParamStore.create(future)
    root = zarr.open_group(future, mode="r+")
    attrs = dict(root.attrs["dasktrain"])
    attrs["format_version"] = 99
    root.update_attributes({"dasktrain": attrs})

    corrupt = tmp_path / "corrupt.zarr"
    ParamStore.create(corrupt)
    root = zarr.open_group(corrupt, mode="r+")
    attrs = dict(root.attrs["dasktrain"])
    attrs["committed"] = 4
    root.update_attributes({"dasktrain": attrs})

    cases = [
        (plain, "without zarr.json"),
        (a_file, "not a directory"),
        (dataset, "format is 'dasktrain.dataset'"),
        (bare, "not a dasktrain parameter store"),
        (an_array, "zarr array"),
        (garbled, "cannot be read"),
        (future, "format_version 99"),
        (corrupt, "'versions'"),
    ]
    for path, pattern in cases:
        with pytest.raises(StoreError, match=pattern) as info:
            ParamStore.open(path)
        assert not isinstance(info.value, StoreNotFoundError)
        assert str(path) in str(info.value)
        assert not ParamStore.exists(path)
    assert not ParamStore.exists(tmp_path / "missing.zarr")


def test_create_refuses_existing_paths(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    ParamStore.create(path, meta={"a": 1})
    assert ParamStore.exists(path)
    with pytest.raises(StoreError, match="already exists") as info:
        ParamStore.create(path)
    assert str(path) in str(info.value)
    assert ParamStore.open(path).meta == {"a": 1}

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(StoreError, match="already exists"):
        ParamStore.create(busy)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert ParamStore.create(empty).committed is None

    with pytest.raises(TypeError, match=r"meta\['x'\]"):
        ParamStore.create(tmp_path / "bad.zarr", meta={"x": object()})
    assert not (tmp_path / "bad.zarr").exists()
    with pytest.raises(ValueError, match="keep_versions"):
        ParamStore.create(tmp_path / "bad.zarr", keep_versions=0)


# ------------------------------------------------------------ crash safety

_COMMIT_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from dasktrain.params import ParamStore

    path, ready = sys.argv[1], Path(sys.argv[2])
    store = ParamStore.open(path)
    with store.lock(owner="commit loop"):
        step = (store.committed or 0) + 1
        first = step
        while True:
            params = {
                "w": np.full((64, 8), float(step)),
                "b": np.array(float(step)),
                "emb": np.full((400, 16), float(step)),
            }
            opt = {
                "adam.count": np.array(step, dtype=np.int64),
                "adam.mu.w": np.full((64, 8), -float(step)),
                "adam.flag": np.array([True, False]),
            }
            meta = {"step": step, "loss": float("nan")}
            store.commit(step, params, opt, meta)
            if step == first + 1:
                ready.touch()
            step += 1
    """
)


def _check_consistent(path: Path) -> int:
    store = ParamStore.open(path)
    committed = store.committed
    assert committed is not None
    assert store.versions[-1] == committed
    assert store.meta["step"] == committed
    assert math.isnan(store.meta["loss"])
    for step in store.versions:
        version = store.read(step)
        assert int(version.opt_state["adam.count"]) == step
        for name, value in version.params.items():
            assert np.all(value == step), (step, name)
        assert np.all(version.opt_state["adam.mu.w"] == -step)
    group = zarr.open_group(path, mode="r")
    assert np.all(group[f"versions/{committed}/params/emb"][...] == committed)
    return committed


@pytest.mark.slow
def test_sigkill_during_commits_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "killed.zarr"
    ParamStore.create(path, keep_versions=2)
    script = tmp_path / "commit_loop.py"
    script.write_text(_COMMIT_LOOP)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    last = 0
    for seed in range(3):
        ready = tmp_path / f"ready{seed}"
        with (tmp_path / f"stderr{seed}").open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, str(script), str(path), str(ready)],
                env=env,
                stderr=stderr,
            )
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert child.poll() is None, (tmp_path / f"stderr{seed}").read_text()
                assert time.monotonic() < deadline, "commit loop did not start"
                time.sleep(0.01)
            time.sleep(random.Random(seed).uniform(0.0, 0.2))
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait() == -signal.SIGKILL
        committed = _check_consistent(path)
        assert committed >= last + 2
        last = committed

    store = ParamStore.open(path)
    with store.lock():  # the killed child's lock is stale: taken over
        store.cleanup()
        assert _version_dirs(path) == [str(s) for s in store.versions]
        store.commit(last + 1, _params(last + 1), _opt(last + 1), {"step": last + 1})
    _assert_version(ParamStore.open(path), last + 1)


# ------------------------------------------------------------ store URLs


def test_location_link_shares_the_file(store_path: Path) -> None:
    store = ParamStore.create(store_path)
    location = dtp.store._Location.from_user(store_path)
    src = store_path / "versions" / "1" / "user" / "c" / "3" / "0"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"shard 3")
    location.link("versions/1/user/c/3/0", "versions/2/user/c/3/0")
    dst = store_path / "versions" / "2" / "user" / "c" / "3" / "0"
    assert dst.read_bytes() == b"shard 3"
    assert os.stat(dst).st_ino == os.stat(src).st_ino  # a hard link
    assert os.stat(src).st_nlink == 2

    other = store_path / "versions" / "1" / "user" / "c" / "4" / "0"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"shard 4")
    location.link("versions/1/user/c/4/0", "versions/2/user/c/3/0")  # replaces
    assert dst.read_bytes() == b"shard 4"
    assert os.stat(src).st_nlink == 1
    assert sorted(p.name for p in dst.parent.iterdir()) == ["0"]  # no debris

    with pytest.raises(StoreNotFoundError, match=r"versions/1/user/c/5/0"):
        location.link("versions/1/user/c/5/0", "versions/2/user/c/5/0")
    for bad in ("", "/etc/passwd", "versions/../../x"):
        with pytest.raises(ValueError, match="invalid key"):
            location.link(bad, "versions/2/x")
    assert store.path == str(store_path)


def test_location_link_copies_where_linking_fails(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ParamStore.create(store_path)
    location = dtp.store._Location.from_user(store_path)
    src = store_path / "versions" / "1" / "w" / "c" / "0"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"rows 0-99")

    def cross_device(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    location.link("versions/1/w/c/0", "versions/2/w/c/0")
    dst = store_path / "versions" / "2" / "w" / "c" / "0"
    assert dst.read_bytes() == b"rows 0-99"
    assert os.stat(dst).st_ino != os.stat(src).st_ino


def test_file_url_is_the_local_store(tmp_path: Path) -> None:
    store = ParamStore.create(f"file://{tmp_path}/run.zarr")
    assert store.path == str(tmp_path / "run.zarr")
    with store.lock():
        store.commit(1, *_small(1), {})
        assert (tmp_path / "run.zarr" / LOCK_FILENAME).is_file()
    _assert_small(ParamStore.open(tmp_path / "run.zarr"), 1)


def test_store_on_an_fsspec_filesystem() -> None:
    """The fsspec code path on the in-memory filesystem: no create-only
    writes there, so the lock is the best-effort one."""
    url = f"memory://dasktrain-unit/{os.getpid()}-{time.monotonic_ns()}/run.zarr"
    with pytest.raises(StoreNotFoundError, match="no object under this prefix"):
        ParamStore.open(url)
    store = ParamStore.create(url, keep_versions=2, meta={"model": "m"})
    assert store.path == url and ParamStore.exists(url)
    assert not store._location.lock_target.atomic
    with store.lock(owner="first"):
        with pytest.raises(StoreLockedError, match="first"):
            ParamStore.open(url).lock(owner="second")
        for step in (1, 2, 10):
            store.commit(step, *_small(step), {"step": step})
        assert store.versions == [2, 10]
        location = store._location
        assert location.children("versions") == ["10", "2", "zarr.json"]
        location.link("versions/10/params/w/c/0/0", "versions/11/params/w/c/0/0")
        assert location.has("versions/11/params/w/c/0/0")
        assert store.cleanup() == ["versions/11"]
    _assert_small(ParamStore.open(url), 10)
    assert ParamStore.open(url).read(2).step == 2
    taken = ParamStore.open(url).lock(owner="gone")
    assert ParamStore.break_lock(url).owner == "gone"
    assert not taken.held
    with store.lock():
        store.remove()
    assert not ParamStore.exists(url)
