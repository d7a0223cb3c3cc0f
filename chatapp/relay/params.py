"""Per-model parameter rules: what an upstream model accepts, applied to the upstream's body.

Some models refuse parameters that every client sends (OpenAI's o1: no ``temperature``,
no system message, ``max_completion_tokens`` instead of ``max_tokens``).  A catalog
model carries rules, one per parameter of the body sent upstream (a dotted path reaches
into nested objects: ``generationConfig.temperature`` for Gemini):

- ``drop`` — removed silently;
- ``rename NEW`` — moved to another name (``max_tokens: rename max_completion_tokens``);
- ``fix VALUE`` — set to that JSON value whatever the client sent (or did not send);
- ``refuse`` — the request is refused with a 400 naming the parameter and the model;

and "fold the system message into the first user turn" for models that refuse system
messages.  The pipeline applies them in one place (``apply``), to the body built for
the route's upstream, for every client dialect and for pass-through bodies alike.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

ACTIONS = ("drop", "rename", "fix", "refuse")
MAX_RULES = 50


class RuleError(ValueError):
    """A rule that cannot be parsed: the message names the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class Rule:
    param: str  # a dotted path in the upstream body
    action: str  # drop | rename | fix | refuse
    value: Any = None  # rename: the new path; fix: the JSON value

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"param": self.param, "action": self.action}
        if self.action in ("rename", "fix"):
            data["value"] = self.value
        return data

    def as_text(self) -> str:
        if self.action == "rename":
            return f"{self.param}: rename {self.value}"
        if self.action == "fix":
            return f"{self.param}: fix {json.dumps(self.value, ensure_ascii=False)}"
        return f"{self.param}: {self.action}"


def _check_path(path: str, where: str) -> str:
    parts = path.split(".")
    if any(not part or not part.replace("_", "a").replace("-", "a").isalnum() for part in parts):
        raise RuleError(
            f"{where}: {path!r} is not a parameter name (letters, digits, _ and -, "
            "dots between nested names)"
        )
    return path


def parse_line(line: str, where: str = "rule") -> Rule:
    """``param: action [argument]``."""
    text = line.strip()
    if ":" not in text:
        raise RuleError(f"{where}: expected 'parameter: action', e.g. 'temperature: drop'")
    param, rest = (part.strip() for part in text.split(":", 1))
    _check_path(param, where)
    action, _, argument = rest.partition(" ")
    action, argument = action.strip().lower(), argument.strip()
    if action not in ACTIONS:
        raise RuleError(f"{where}: unknown action {action!r}: expected {', '.join(ACTIONS)}")
    if action in ("drop", "refuse"):
        if argument:
            raise RuleError(f"{where}: {action} takes no argument")
        return Rule(param, action)
    if not argument:
        what = "the new name" if action == "rename" else 'a JSON value, e.g. 1 or "low"'
        raise RuleError(f"{where}: {action} needs {what}")
    if action == "rename":
        return Rule(param, action, _check_path(argument, where))
    try:
        value = json.loads(argument)
    except json.JSONDecodeError:
        raise RuleError(
            f'{where}: fix needs a JSON value (a number, true/false, null or a "quoted" string), '
            f"got {argument!r}"
        ) from None
    return Rule(param, action, value)


def parse_text(text: str) -> list[Rule]:
    """Rules, one per line; blank lines and lines starting with ``#`` are ignored."""
    rules: list[Rule] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        rule = parse_line(line, f"line {number}")
        if rule.param in seen:
            raise RuleError(f"line {number}: {rule.param} already has a rule")
        seen.add(rule.param)
        rules.append(rule)
    if len(rules) > MAX_RULES:
        raise RuleError(f"at most {MAX_RULES} rules, got {len(rules)}")
    return rules


def from_json(data: Any) -> tuple[Rule, ...]:
    """The rules stored on a model (``CatalogModel.param_rules``)."""
    rules = []
    for item in data or ():
        if isinstance(item, dict) and item.get("action") in ACTIONS and item.get("param"):
            rules.append(Rule(str(item["param"]), str(item["action"]), item.get("value")))
    return tuple(rules)


def as_text(rules: tuple[Rule, ...] | list[Rule]) -> str:
    return "\n".join(rule.as_text() for rule in rules)


# --- Applying ---------------------------------------------------------------------------

_MISSING = object()


def _parent(body: dict[str, Any], path: str, *, create: bool) -> tuple[dict[str, Any] | None, str]:
    *parents, leaf = path.split(".")
    node: Any = body
    for name in parents:
        child = node.get(name) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            if not create:
                return None, leaf
            child = node[name] = {}
        node = child
    return (node if isinstance(node, dict) else None), leaf


def _pop(body: dict[str, Any], path: str) -> Any:
    parent, leaf = _parent(body, path, create=False)
    if parent is None or leaf not in parent:
        return _MISSING
    return parent.pop(leaf)


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    parent, leaf = _parent(body, path, create=True)
    assert parent is not None
    parent[leaf] = value


def refused(body: dict[str, Any], rules: tuple[Rule, ...]) -> str | None:
    """The first parameter present in ``body`` that a rule refuses, if any."""
    for rule in rules:
        if rule.action == "refuse":
            parent, leaf = _parent(body, rule.param, create=False)
            if parent is not None and leaf in parent:
                return rule.param
    return None


def apply(body: dict[str, Any], rules: tuple[Rule, ...], *, fold_system: bool) -> dict[str, Any]:
    """A copy of the upstream body with the rules applied (``refused`` is checked first)."""
    if not rules and not fold_system:
        return body
    body = copy.deepcopy(body)
    for rule in rules:
        if rule.action == "drop":
            _pop(body, rule.param)
        elif rule.action == "rename":
            value = _pop(body, rule.param)
            if value is not _MISSING:
                _set(body, rule.value, value)
        elif rule.action == "fix":
            _set(body, rule.param, copy.deepcopy(rule.value))
    if fold_system:
        _fold_system(body)
    return body


def _text_of(content: Any) -> str:
    """The text of a message content or system field in any of the three wire shapes."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):  # Gemini: {"parts": [{"text": ...}]}
        return _text_of(content.get("parts"))
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and "text" in part
        )
    return ""


def _prepend(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return f"{text}\n\n{content}"
    if isinstance(content, list):
        return [{"type": "text", "text": text}, *content]
    return text


def _fold_system(body: dict[str, Any]) -> None:
    """Move system instructions into the first user turn (OpenAI, Anthropic and Gemini bodies)."""
    messages = body.get("messages")
    if isinstance(messages, list):  # OpenAI (system/developer messages) or Anthropic (system)
        texts = [_text_of(body.pop("system"))] if "system" in body else []
        kept = []
        for message in messages:
            if isinstance(message, dict) and message.get("role") in ("system", "developer"):
                texts.append(_text_of(message.get("content")))
            else:
                kept.append(message)
        text = "\n\n".join(t for t in texts if t)
        if text:
            for message in kept:
                if isinstance(message, dict) and message.get("role") == "user":
                    message["content"] = _prepend(message.get("content"), text)
                    break
            else:
                kept.insert(0, {"role": "user", "content": text})
        body["messages"] = kept
        return
    contents = body.get("contents")
    if isinstance(contents, list) and "systemInstruction" in body:  # Gemini
        text = _text_of(body.pop("systemInstruction"))
        if not text:
            return
        for content in contents:
            if isinstance(content, dict) and content.get("role", "user") == "user":
                content["parts"] = [{"text": text}, *(content.get("parts") or [])]
                return
        contents.insert(0, {"role": "user", "parts": [{"text": text}]})
