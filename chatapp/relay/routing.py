"""Route choice and the per-route circuit breaker.

Routes of the best (lowest) priority are tried first, in a weighted random order;
then the next priority.  A route that fails ``FAILURE_THRESHOLD`` times in a row
(or is told to back off by a 429's Retry-After) is *open*: it goes to the back of
the order until its cool-down ends, when one request probes it again.

Breaker state is per process on purpose: it reflects what this process sees of
each upstream, needs no I/O on the hot path, and heals by itself.  Beside it each
route keeps its last outcome (latency of the last success, the last error) for the
console's health column (``health``): also this process's view only.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from chatapp.relay.catalog import RouteChoice
from chatapp.relay.upstreams import Target

FAILURE_THRESHOLD = 3
COOLDOWN_SECONDS = 30.0


@dataclass(slots=True)
class _State:
    failures: int = 0
    open_until: float = 0.0


@dataclass(slots=True)
class Observation:
    """What this process last saw of one route."""

    last_latency: float | None = None  # seconds to the answer's start, last success
    last_success_at: float | None = None  # time.time()
    last_error: str = ""
    last_error_at: float | None = None  # time.time()

    @property
    def last_latency_ms(self) -> int | None:
        return round(self.last_latency * 1000) if self.last_latency is not None else None


@dataclass(frozen=True, slots=True)
class Health:
    """A route's breaker as the console shows it."""

    state: str  # "closed", "half-open" or "open"
    failures: int  # consecutive failures
    observation: Observation


_states: dict[int, _State] = {}
_observations: dict[int, Observation] = {}
_rng = random.Random()


def is_open(route_id: int, now: float | None = None) -> bool:
    state = _states.get(route_id)
    return state is not None and state.open_until > (now if now is not None else time.monotonic())


def order(routes: tuple[RouteChoice, ...], rng: random.Random | None = None) -> list[Target]:
    """The order to try routes in: priority groups, weighted shuffle, open circuits last."""
    rng = rng or _rng
    now = time.monotonic()
    # Efraimidis–Spirakis: sorting by u**(1/w) is a weighted shuffle without replacement.
    keyed = sorted(
        routes, key=lambda choice: (choice.priority, -(rng.random() ** (1.0 / choice.weight)))
    )
    closed = [choice.target for choice in keyed if not is_open(choice.target.route_id, now)]
    opened = [choice.target for choice in keyed if is_open(choice.target.route_id, now)]
    return closed + opened


def breaker_state(route_id: int) -> int:
    """For metrics: 0 closed, 1 half-open (cool-down over, the next request probes), 2 open."""
    state = _states.get(route_id)
    if state is None or not state.open_until:
        return 0
    return 2 if state.open_until > time.monotonic() else 1


BREAKER_STATES = ("closed", "half-open", "open")


def health(route_id: int) -> Health:
    """This process's breaker state, consecutive failures and last outcome of a route."""
    state = _states.get(route_id)
    return Health(
        BREAKER_STATES[breaker_state(route_id)],
        state.failures if state is not None else 0,
        _observations.get(route_id) or Observation(),
    )


def record_success(route_id: int, latency: float | None = None) -> None:
    _states.pop(route_id, None)
    if latency is not None:
        seen = _observations.setdefault(route_id, Observation())
        seen.last_latency = latency
        seen.last_success_at = time.time()


def record_failure(route_id: int, retry_after: float | None = None, error: str = "") -> None:
    if error:
        seen = _observations.setdefault(route_id, Observation())
        seen.last_error = error[:500]
        seen.last_error_at = time.time()
    state = _states.setdefault(route_id, _State())
    state.failures += 1
    now = time.monotonic()
    if retry_after:
        state.open_until = max(state.open_until, now + retry_after)
    if state.failures >= FAILURE_THRESHOLD:
        state.open_until = max(state.open_until, now + COOLDOWN_SECONDS)


def reset() -> None:
    _states.clear()
    _observations.clear()
