"""Node-label selectors: the resource check must read them as Ray does, or it passes runs that never start."""

import pytest

from bertray.data.config import DataSection
from bertray.train.config import ScalingSection
from bertray.errors import ConfigError
from bertray.labels import matches, selector_problem


@pytest.mark.parametrize("selector, labels, expected", [
    ({}, {}, True),
    ({"role": "data"}, {"role": "data"}, True),
    ({"role": "data"}, {"role": "trainer"}, False),
    ({"role": "data"}, {}, False),                                   # an absent label is not a match
    ({"role": "!data"}, {}, True),                                   # ... but satisfies a negation
    ({"role": "!data"}, {"role": "data"}, False),
    ({"role": "in(data, spare)"}, {"role": "spare"}, True),
    ({"role": "!in(data,spare)"}, {"role": "spare"}, False),
    ({"role": "data", "zone": "a"}, {"role": "data", "zone": "b"}, False),    # every key must match
])
def test_matches_reads_rays_selector_syntax(selector, labels, expected):
    assert matches(selector, labels) is expected


@pytest.mark.timeout(120)
def test_a_selector_that_ray_runs_on_a_real_node_matches_that_nodes_labels(ray_cluster):
    """Ray's own labels of the test cluster's node: its id label is matched by the same rule."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    labels = node.get("Labels") or {}
    assert matches({"ray.io/node-id": node["NodeID"]}, labels)
    assert not matches({"ray.io/node-id": "!" + node["NodeID"]}, labels)


@pytest.mark.parametrize("selector", [{"role": "in(a,"}, {"bad key!": "x"}, {"role": 3}, {"ray.io/x": "y"},
                                      {"role": "in(a,,b)"}])
def test_bad_selectors_are_refused_with_their_key(selector):
    assert selector_problem(selector)
    with pytest.raises(ConfigError, match="data.node_labels"):
        DataSection(corpus=("c.txt",), node_labels=selector)
    with pytest.raises(ConfigError, match="scaling.node_labels"):
        ScalingSection(node_labels=selector)
