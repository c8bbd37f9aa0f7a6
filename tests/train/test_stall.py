"""No silent hang: the resource check before a run, and the watchdog on the trainer's wait for batches.

Without Ray: the placement on paper and the watchdog over a source that blocks. With Ray: the case
that used to hang for minutes without a line (two Train workers holding both CPUs of a 2-CPU
machine, the data stages never placed) now stops at once with a message naming the settings, and,
with the check turned off, the watchdog fails the run with its diagnosis instead of waiting forever."""

import dataclasses
import threading
import time
import uuid

import pytest

from bertray.config import from_mapping
from bertray.train.config import PretrainConfig
from bertray.train.resources import ResourceShortage, check_resources, data_selector, place, run_demands
from bertray.train.stall import BatchWatchdog, DataStall


def test_a_local_ray_is_not_taken_for_an_autoscaling_cluster(ray_cluster):
    """Its monitor reports an 'autoscaler' too, mapping each node to its own id: the check must
    still fail there (a real autoscaler only earns a warning)."""
    from bertray.train.pretrain import _has_autoscaler

    assert not _has_autoscaler()


def config(**sections) -> PretrainConfig:
    base = {"model": {"preset": "tiny"},
            "data": {"corpus": ["corpus.txt"], "read_cpus": 0.25, "tokenizer_cpus": 0.5, "tokenizer_actors": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return from_mapping(PretrainConfig, base)


# --------------------------------------------------------------------------------------------
# Resource check


def test_the_two_cpu_hang_is_named_before_it_starts():
    """Two Train workers of one CPU each on a 2-CPU machine: nothing is left for the data stages."""
    cfg = config(scaling={"num_workers": 2})
    with pytest.raises(ResourceShortage) as err:
        check_resources(cfg, [{"CPU": 2.0}])
    message = str(err.value)
    for words in ("scaling.num_workers", "scaling.cpus_per_worker", "data.read_cpus", "data.tokenizer_cpus",
                  "tokenizer actor 1 of 1", "2.75 CPU", "the cluster has 2 CPU"):
        assert words in message, (words, message)


def test_a_run_that_fits_passes_and_fractional_data_cpus_fit_beside_the_worker():
    check_resources(config(), [{"CPU": 2.0}])
    check_resources(config(scaling={"num_workers": 2, "cpus_per_worker": 0.5}), [{"CPU": 2.0}])


def test_placement_is_per_node_not_a_sum():
    """Two nodes of 2 CPUs hold 4 CPUs, but not a worker that needs 3 on one node."""
    cfg = config(scaling={"cpus_per_worker": 3})
    with pytest.raises(ResourceShortage, match="Train worker 1 of 1"):
        check_resources(cfg, [{"CPU": 2.0}, {"CPU": 2.0}])
    check_resources(cfg, [{"CPU": 4.0}])


def test_gpu_workers_need_gpu_nodes_and_data_runs_on_cpu_nodes():
    cfg = config(scaling={"num_workers": 2, "use_gpu": True, "cpus_per_worker": 2},
                 data={"tokenizer_actors": 3, "tokenizer_cpus": 1})
    nodes = [{"CPU": 0.0}, {"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0}]          # head, GPU node, data node
    assert place(run_demands(cfg), nodes) == []
    with pytest.raises(ResourceShortage, match="2 GPU"):
        check_resources(cfg, [{"CPU": 0.0}, {"CPU": 16.0}])                  # no GPU anywhere


def test_an_autoscaling_pool_needs_only_its_first_actor():
    cfg = config(data={"tokenizer_actors": 0, "tokenizer_cpus": 1.0})
    assert [d.what for d in run_demands(cfg)] == ["Train worker 1 of 1", "tokenizer actor 1 of 1", "read task"]


def test_labels_keep_the_data_stages_on_data_nodes_and_the_workers_on_trainer_nodes():
    """The check places by the same selectors Ray schedules by: a data node whose CPUs the tokenizer
    actor needs cannot lend them to a Train worker, and a missing label is named with its setting."""
    cfg = config(scaling={"node_labels": {"bertray-role": "trainer"}, "cpus_per_worker": 1},
                 data={"node_labels": {"bertray-role": "data"}, "node_labels_fallback": False, "tokenizer_cpus": 1})
    nodes = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 2.0}]
    labels = [{}, {"bertray-role": "trainer"}, {"bertray-role": "data"}]
    assert place(run_demands(cfg), nodes, labels) == []
    with pytest.raises(ResourceShortage, match=r"Train worker 1 of 1 needs a node with the labels bertray-role=trainer "
                                               r"\(scaling.node_labels\).*1 live node\(s\) have those labels but not"):
        check_resources(cfg, [{"CPU": 0.0}, {"CPU": 0.5}, {"CPU": 8.0}], labels)   # CPUs only where data may run
    with pytest.raises(ResourceShortage, match=r"tokenizer actor 1 of 1 .*bertray-role=data \(data.node_labels\).*"
                                               r"0 live node\(s\).*node_labels_fallback: true"):
        check_resources(cfg, nodes, [{}, {"bertray-role": "trainer"}, {"bertray-role": "spare"}])


def test_without_live_data_nodes_the_stages_fall_back_to_any_node_when_allowed(caplog):
    cfg = config(data={"node_labels": {"bertray-role": "data"}})
    resources = [{"CPU": 0.0}, {"CPU": 4.0}, {"CPU": 2.0}]
    assert data_selector(cfg, [{}, {"bertray-role": "trainer"}, {"bertray-role": "data"}], resources) == {
        "bertray-role": "data"}
    assert not caplog.records
    # the data node is gone (or up without CPUs): anywhere, and said
    assert data_selector(cfg, [{}, {"bertray-role": "trainer"}], resources[:2]) == {}
    assert "no live node with CPUs has the data labels (bertray-role=data)" in caplog.text
    strict = config(data={"node_labels": {"bertray-role": "data"}, "node_labels_fallback": False})
    assert data_selector(strict, [{}, {"bertray-role": "trainer"}], resources[:2]) == {"bertray-role": "data"}
    check_resources(cfg, resources[:2], [{}, {"bertray-role": "trainer"}], data_selector(cfg, [{}, {}], resources[:2]))


# --------------------------------------------------------------------------------------------
# Watchdog


def blocking_source(items: int, release: threading.Event):
    """A stalled source: `items` batches, then a read that blocks until released."""
    yield from range(items)
    release.wait()
    yield items


def test_a_stalled_source_warns_then_fails_with_the_diagnosis(caplog):
    release = threading.Event()
    watchdog = BatchWatchdog(blocking_source(2, release), warn_after_s=0.2, fail_after_s=0.6,
                             describe=lambda: "CPU 0 of 2 free")
    assert [next(watchdog), next(watchdog)] == [0, 1]
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="bertray.train"), pytest.raises(DataStall) as err:
        next(watchdog)
    assert 0.6 <= time.monotonic() - started < 5
    assert "no next batch for" in str(err.value) and "CPU 0 of 2 free" in str(err.value)
    assert any("waiting" in r.message and "CPU 0 of 2 free" in r.message for r in caplog.records)
    release.set()


def test_the_first_batch_gets_longer():
    release = threading.Event()
    watchdog = BatchWatchdog(blocking_source(0, release), warn_after_s=0.1, fail_after_s=0.2, describe=lambda: "x")
    started = time.monotonic()
    with pytest.raises(DataStall, match="no first batch"):
        next(watchdog)
    assert time.monotonic() - started >= 0.2 * 3
    release.set()


def test_a_slow_but_moving_source_passes_and_errors_and_the_end_come_through():
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i
        raise ValueError("bad file")

    watchdog = BatchWatchdog(slow(), warn_after_s=1.0, fail_after_s=2.0, describe=lambda: "x")
    assert [next(watchdog) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad file"):
        next(watchdog)
    assert list(BatchWatchdog(iter([1, 2]), warn_after_s=1, fail_after_s=1, describe=lambda: "x")) == [1, 2]


def test_closing_stops_the_thread_and_closes_the_source():
    """A phase that ends before its stream: the puller stops and the source's cleanup runs."""
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    watchdog = BatchWatchdog(endless(), warn_after_s=1, fail_after_s=2, describe=lambda: "x")
    assert [next(watchdog) for _ in range(5)] == [0, 1, 2, 3, 4]
    watchdog.close()
    assert closed.wait(5) and (watchdog._thread.join(5) or not watchdog._thread.is_alive())


def test_fail_limit_zero_only_warns():
    release = threading.Event()
    watchdog = BatchWatchdog(blocking_source(0, release), warn_after_s=0.05, fail_after_s=0, describe=lambda: "x")
    threading.Timer(0.5, release.set).start()
    assert next(watchdog) == 0


# --------------------------------------------------------------------------------------------
# Through Ray


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_two_worker_run_on_two_cpus_fails_fast_with_the_settings(ray_cluster, tmp_path, shared_data):
    from bertray.train.pretrain import run_pretraining

    cfg = embedded(tmp_path, shared_data, scaling={"num_workers": 2, "cpus_per_worker": 1},
                   train={"batch_wait_warn_s": 3, "batch_wait_fail_s": 10})     # should the check let it start
    started = time.monotonic()
    with pytest.raises(ResourceShortage, match="scaling.num_workers"):
        run_pretraining(cfg)
    assert time.monotonic() - started < 30


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_with_the_check_off_the_watchdog_fails_the_hung_run(ray_cluster, tmp_path, shared_data):
    """The same hang with `scaling.resource_check: skip`: the data stages are never placed, and the
    watchdog fails the run with what it saw instead of waiting forever."""
    from bertray.train.pretrain import run_pretraining

    cfg = embedded(tmp_path, shared_data, scaling={"num_workers": 2, "cpus_per_worker": 1, "resource_check": "skip"},
                   train={"batch_wait_warn_s": 2, "batch_wait_fail_s": 5})       # the first batch: 15 s
    started = time.monotonic()
    with pytest.raises(Exception) as err:
        run_pretraining(cfg)
    text = str(err.value)
    assert "DataStall" in text or "no first batch" in text, text[-2000:]
    assert "CPU 0 of 2 free" in text, text[-2000:]
    assert time.monotonic() - started < 200


def embedded(tmp_path, shared_data, **sections) -> PretrainConfig:
    from bertray.cli import with_repo_paths
    from bertray.config import load_config

    cfg = load_config(PretrainConfig, "flows/configs/embedded.yaml")
    cfg = dataclasses.replace(cfg, data=with_repo_paths(cfg.data))
    mapping = dataclasses.asdict(cfg)
    mapping["run"].update(output=str(tmp_path), name=f"stall-{uuid.uuid4().hex[:8]}", max_failures=0)
    mapping["train"].update(max_steps=4, log_every=2, eval_every=0, eval_batches=1, checkpoint_every=4)
    for name, values in sections.items():
        mapping[name].update(values)
    return from_mapping(PretrainConfig, mapping)
