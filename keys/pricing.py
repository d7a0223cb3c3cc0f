"""Prices per 1M tokens and what a request costs. Money is ``Decimal`` end to end."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal

MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")


@dataclass(frozen=True, slots=True)
class Price:
    input: Decimal  # per 1M input tokens
    output: Decimal  # per 1M output tokens
    cached_input: Decimal | None  # per 1M cached input tokens; None: the input price
    currency: str
    effective_from: datetime
    cache_write: Decimal | None = None  # per 1M input tokens written to a prompt cache; None: input

    def cost(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> Decimal:
        """Exact cost: cache reads and cache writes at their own prices (the input price
        when unset), the rest of the input at the input price, output at the output price.
        ``input_tokens`` counts every input token, cache reads and writes included."""
        cached = min(cached_tokens, input_tokens)
        written = min(cache_write_tokens, input_tokens - cached)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write is None else self.cache_write
        return (
            (input_tokens - cached - written) * self.input
            + cached * cached_price
            + written * write_price
            + output_tokens * self.output
        ) / MILLION


def price_at(prices: tuple[Price, ...], when: datetime) -> Price | None:
    """The price in force at ``when``: the latest whose effective_from is not after it."""
    for price in prices:  # newest first
        if price.effective_from <= when:
            return price
    return None


def to_nano(amount: Decimal) -> int:
    """Money as whole nano-units for the limiter's integer counters (rounded up)."""
    return int((amount / NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(units: int) -> Decimal:
    return Decimal(units) * NANO
