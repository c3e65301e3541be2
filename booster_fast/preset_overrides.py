"""`--set KEY=VALUE` over a nested preset: dotted keys reach the groups (align.steps), values parse as JSON.

Only a key the preset has can be set, and only to a value of its type (a whole number also fits a float field;
a field that is null in the preset takes null or an integer), so that a typo is an error, not a setting that is
silently ignored. Used by `booster-fast experiment`.
"""
from __future__ import annotations

import copy
import json


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, null, true/false, "quoted"), else the text as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(preset: dict, items: list[str]) -> tuple[dict, dict]:
    """(a copy of `preset` with each --set KEY=VALUE applied, {key: value} in the order given); UsageError for a
    malformed item, an unknown key or a value of the wrong type."""
    from .cli import UsageError

    p, applied = copy.deepcopy(preset), {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. align.steps=20")
        key = key.strip()
        node, leaf = _field(p, key)
        value = parse_value(text)
        _check_type(key, node[leaf], value)
        node[leaf], applied[key] = value, value
    return p, applied


def _field(p: dict, key: str) -> tuple[dict, str]:
    """(the dict that holds an existing preset field, the field's name) for a dotted --set key."""
    from .cli import UsageError

    *groups, leaf = key.split(".")
    node, prefix = p, ""
    for group in groups:
        if not isinstance(node.get(group), dict):
            raise UsageError(f"--set {key}: unknown key ({_known(node, prefix)})")
        node, prefix = node[group], f"{prefix}{group}."
    if leaf not in node:
        raise UsageError(f"--set {key}: unknown key ({_known(node, prefix)})")
    if isinstance(node[leaf], dict):
        raise UsageError(f"--set {key}: a group of settings; set one of them ({_known(node[leaf], key + '.')})")
    return node, leaf


def _known(node: dict, prefix: str) -> str:
    names = [f"{prefix}{k}" + (".KEY" if isinstance(v, dict) else "") for k, v in node.items()]
    return "the preset has " + ", ".join(names)


KINDS = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _check_type(key: str, old, new):
    """UsageError unless `new` has the preset field's JSON type (a whole number also fits a float field); a
    field that is null in the preset (a cap that is off, such as attack.eval_rows) takes null or an integer."""
    from .cli import UsageError

    allowed = (type(None), int) if old is None else (float, int) if type(old) is float else (type(old),)
    if type(new) not in allowed:
        kind = " or ".join(KINDS[t] for t in allowed)
        raise UsageError(f"--set {key}={json.dumps(new)}: {key} is {kind} ({json.dumps(old)} in the preset), not "
                         f"{KINDS.get(type(new), 'a ' + type(new).__name__)}")
