"""How much a model may think, in each provider's terms.

OpenAI-compatible APIs take an effort (``reasoning_effort``: none, minimal, low, medium,
high, xhigh); Anthropic and Gemini take a budget of thinking tokens (``thinking.budget_tokens``,
``thinkingConfig.thinkingBudget``).  A request carries both in the canonical
``ChatRequest``: the one the client gave, and the other read from it here, so any
upstream type is asked in its own terms.
"""

from __future__ import annotations

#: effort → thinking tokens for upstreams that take a budget
BUDGETS = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
    "xhigh": 32768,
}
EFFORTS = tuple(BUDGETS)
#: the smallest thinking budget Anthropic accepts
ANTHROPIC_MIN_BUDGET = 1024


def budget_for(effort: str) -> int:
    return BUDGETS[effort]


def effort_for(budget: int) -> str:
    """The effort of a thinking budget: the level whose budget it reaches, at least low."""
    if budget <= 0:
        return "none"
    if budget < BUDGETS["medium"]:
        return "low"
    if budget < BUDGETS["high"]:
        return "medium"
    return "high"
