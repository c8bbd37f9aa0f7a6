"""Ray node-label selectors: checked when the config is read, matched when the run is placed.

A selector maps a label key to a value expression in Ray's syntax: `data` (equal), `!data` (not
equal), `in(a,b)` (one of), `!in(a,b)` (none of). The same selector goes to Ray (which schedules
on it) and to the resource check before the run (which must agree with Ray, or it would pass a
run that then never starts), so both read it through `matches`.
"""

from __future__ import annotations

import re
from typing import Mapping

# Kubernetes' label syntax, which Ray's labels follow: an optional DNS-style prefix and a name.
_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SET = re.compile(r"^(!?)in\((.*)\)$")


def selector_problem(selector: Mapping[str, str]) -> str | None:
    """What is wrong with `selector`, or None: a message for `ConfigError`."""
    for key, expression in selector.items():
        if not isinstance(key, str) or not _KEY.match(key):
            return f"{key!r} is not a label key (letters, digits, '-', '_', '.', an optional 'prefix/')"
        if key.startswith("ray.io/") and key != "ray.io/node-id" and key != "ray.io/accelerator-type":
            return f"{key!r}: Ray reserves the ray.io/ prefix"
        if not isinstance(expression, str):
            return f"{key}: {expression!r} must be a string (value, !value, in(a,b) or !in(a,b))"
        _, values = _parse(expression)
        bad = [v for v in values if not v or not _VALUE.match(v)]
        if bad:
            return f"{key}: {expression!r} is not a label value expression (value, !value, in(a,b) or !in(a,b))"
    return None


def _parse(expression: str) -> tuple[bool, tuple[str, ...]]:
    """(negated, values) of one value expression."""
    expression = expression.strip()
    found = _SET.match(expression)
    if found:
        return bool(found.group(1)), tuple(v.strip() for v in found.group(2).split(","))
    if expression.startswith("!"):
        return True, (expression[1:].strip(),)
    return False, (expression,)


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a node with `labels` satisfies `selector` (an absent label satisfies only negations)."""
    for key, expression in selector.items():
        negated, values = _parse(expression)
        if (labels.get(key) in values) == negated:
            return False
    return True


def describe(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items()) or "any node"
