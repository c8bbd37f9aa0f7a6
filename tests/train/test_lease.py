"""bertray/train/lease.py: one driver per run directory, locally and on a real S3-compatible
server (moto on loopback), with stale leases taken over by exactly one driver."""

import datetime as dt
import json
import logging
import os
import socket
import threading
import time

import fsspec
import pytest

from bertray.train.lease import LEASE_FILE, RunLease, RunLeaseError, _create, read_lease


def age_lease(run_url: str, seconds: float) -> None:
    """Make the run's lease look as if its driver stopped beating `seconds` ago."""
    fs, directory = fsspec.core.url_to_fs(run_url)
    path = directory.rstrip("/") + "/" + LEASE_FILE
    record = json.loads(fs.cat_file(path))
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)
    record["heartbeat"] = old.isoformat(timespec="seconds")
    fs.pipe_file(path, json.dumps(record).encode())


def race(count: int, attempt) -> tuple[list, list]:
    """Run `attempt` in `count` threads released together; (results, errors)."""
    start, results, errors = threading.Barrier(count), [], []

    def one():
        start.wait()
        try:
            results.append(attempt())
        except RunLeaseError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# --------------------------------------------------------------------------------------------
# Local run directories


def test_second_driver_is_refused_with_the_holder_named(tmp_path):
    run = str(tmp_path / "runs" / "bert")
    first = RunLease.acquire(run)
    holder = read_lease(run)
    assert holder == first.holder
    assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
    assert len(holder.token) == 32
    with pytest.raises(RunLeaseError) as error:
        RunLease.acquire(run)
    message = str(error.value)
    assert message.startswith(os.path.join(run, LEASE_FILE))
    for part in (f"host {holder.host}", f"pid {holder.pid}", f"started {holder.started}",
                 f"last heartbeat {holder.heartbeat}", "Wait for it", "stop it", "another run.name"):
        assert part in message
    assert read_lease(run) == holder            # the refused driver changed nothing

    first.release()
    assert read_lease(run) is None
    with RunLease.acquire(run) as second:
        assert read_lease(run).token == second.holder.token != holder.token
    assert read_lease(run) is None              # the context manager released it
    assert [p.name for p in (tmp_path / "runs" / "bert").iterdir()] == []   # no temporary files left


def test_refresh_moves_the_heartbeat_and_release_is_idempotent(tmp_path):
    lease = RunLease.acquire(str(tmp_path))
    before = read_lease(str(tmp_path)).heartbeat
    time.sleep(0.01)
    lease.refresh()
    after = read_lease(str(tmp_path))
    assert after.heartbeat > before and after.started == lease.holder.started
    lease.release()
    lease.release()
    assert read_lease(str(tmp_path)) is None


def test_a_stale_lease_is_taken_over_and_its_old_holder_stops(tmp_path, caplog):
    run = str(tmp_path)
    old = RunLease.acquire(run)
    age_lease(run, 3600)
    with caplog.at_level(logging.WARNING, logger="bertray.train"):
        new = RunLease.acquire(run, stale_after_s=600)
    assert f"pid {old.holder.pid}" in caplog.text and "taking over" in caplog.text
    assert read_lease(run).token == new.holder.token
    with pytest.raises(RunLeaseError, match="lease was lost.*now held by"):
        old.refresh()
    old.release()                                # must not delete the new holder's lease
    assert read_lease(run).token == new.holder.token
    new.refresh()
    new.release()
    assert sorted(os.listdir(tmp_path)) == []    # the takeover claim is gone too


def test_a_fresh_lease_is_not_stale_under_a_short_limit_until_it_ages(tmp_path):
    run = str(tmp_path)
    RunLease.acquire(run, stale_after_s=60)
    with pytest.raises(RunLeaseError):
        RunLease.acquire(run, stale_after_s=60)
    time.sleep(0.05)
    taker = RunLease.acquire(run, stale_after_s=0.01)
    assert read_lease(run).token == taker.holder.token


def test_refresh_after_the_lease_was_deleted_raises(tmp_path):
    lease = RunLease.acquire(str(tmp_path))
    (tmp_path / LEASE_FILE).unlink()
    with pytest.raises(RunLeaseError, match="deleted"):
        lease.refresh()


def test_heartbeat_thread_beats_and_reports_a_lost_lease(tmp_path):
    run = str(tmp_path)
    lease = RunLease.acquire(run)
    lost = threading.Event()
    lease.start_heartbeat(0.02, on_lost=lambda exc: lost.set())
    first = read_lease(run).heartbeat
    deadline = time.time() + 5
    while read_lease(run).heartbeat == first and time.time() < deadline:
        time.sleep(0.02)
    assert read_lease(run).heartbeat > first
    age_lease(run, 3600)
    # the thread may beat once more between aging and acquiring: then the lease is fresh again
    for _ in range(50):
        try:
            taker = RunLease.acquire(run)
            break
        except RunLeaseError:
            age_lease(run, 3600)
    assert lost.wait(5)
    assert isinstance(lease.lost, RunLeaseError)
    lease.release()
    assert read_lease(run).token == taker.holder.token


def test_only_one_of_many_simultaneous_drivers_wins(tmp_path):
    run = str(tmp_path / "run")
    winners, refused = race(16, lambda: RunLease.acquire(run))
    assert len(winners) == 1 and len(refused) == 15
    assert read_lease(run).token == winners[0].holder.token


def test_only_one_of_many_simultaneous_takers_wins_a_stale_lease(tmp_path):
    run = str(tmp_path)
    RunLease.acquire(run)
    for _ in range(5):
        age_lease(run, 3600)
        winners, refused = race(12, lambda: RunLease.acquire(run))
        assert len(winners) == 1 and len(refused) == 11, refused
        assert read_lease(run).token == winners[0].holder.token
    assert sorted(os.listdir(tmp_path)) == [LEASE_FILE]


def test_an_unreadable_lease_says_how_to_clear_it(tmp_path):
    (tmp_path / LEASE_FILE).write_text("{not json")
    with pytest.raises(RunLeaseError, match="unreadable run lease.*delete the file"):
        RunLease.acquire(str(tmp_path))


def test_a_filesystem_without_conditional_create_still_refuses_but_warns(caplog):
    run = "memory://bertray-lease-test/run"
    with caplog.at_level(logging.WARNING, logger="bertray.train"):
        lease = RunLease.acquire(run)
    assert "best effort" in caplog.text
    with pytest.raises(RunLeaseError, match="already being written"):
        RunLease.acquire(run)
    lease.release()
    assert read_lease(run) is None


# --------------------------------------------------------------------------------------------
# S3 (moto on loopback)


def test_s3_conditional_create_is_decided_by_the_server(s3_bucket, monkeypatch):
    """If-None-Match: * is refused by the server itself; no exists() check stands in for it."""
    fs, path = fsspec.core.url_to_fs(f"s3://{s3_bucket}/runs/x/{LEASE_FILE}")
    monkeypatch.setattr(fs, "exists", lambda *a, **k: pytest.fail("the S3 create must not check exists() first"))
    _create(fs, path, b"first")
    with pytest.raises(FileExistsError):
        _create(fs, path, b"second")
    assert fs.cat_file(path) == b"first"


def test_s3_second_driver_is_refused_and_stale_lease_taken_over(s3_bucket, caplog):
    run = f"s3://{s3_bucket}/runs/bert"
    with caplog.at_level(logging.WARNING, logger="bertray.train"):
        first = RunLease.acquire(run)
    assert "best effort" not in caplog.text
    with pytest.raises(RunLeaseError) as error:
        RunLease.acquire(run)
    assert str(error.value).startswith(f"{run}/{LEASE_FILE}")
    assert f"pid {first.holder.pid}" in str(error.value) and "another run.name" in str(error.value)

    first.refresh()
    age_lease(run, 3600)
    second = RunLease.acquire(run)
    with pytest.raises(RunLeaseError, match="lost"):
        first.refresh()
    first.release()
    assert read_lease(run).token == second.holder.token
    second.release()
    assert read_lease(run) is None
    fs, directory = fsspec.core.url_to_fs(run)
    assert not fs.exists(f"{directory}/{LEASE_FILE}")
    with RunLease.acquire(run):
        pass
