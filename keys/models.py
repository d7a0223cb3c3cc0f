"""API keys and the usage ledger."""

from __future__ import annotations

import hashlib
import secrets
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    from keys.limiter import Limits

KEY_PREFIX = "sk-"
KEY_RANDOM_LENGTH = 48
VISIBLE_PREFIX_LENGTH = 12


def hash_key(raw_key: str) -> str:
    """SHA-256 of the full key.

    The key carries 48 random characters (~285 bits), so a fast unsalted hash is
    safe here and lets every request find its key with one indexed lookup.
    """
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return KEY_PREFIX + "".join(secrets.choice(alphabet) for _ in range(KEY_RANDOM_LENGTH))


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def by_prefix_or_id(self, ref: str) -> ApiKey:
        """One key named by its id or its visible prefix (``sk-AbCdEfGh``)."""
        if ref.isdigit():
            return self.get(pk=int(ref))
        matches = list(self.filter(prefix__startswith=ref)[:2]) if len(ref) >= 6 else []
        if len(matches) != 1:
            raise self.model.DoesNotExist(
                f"no key with id or prefix {ref!r}"
                if not matches
                else f"prefix {ref!r} is ambiguous"
            )
        return matches[0]


class BudgetPeriod(models.TextChoices):
    DAILY = "daily", _("daily")
    WEEKLY = "weekly", _("weekly")
    MONTHLY = "monthly", _("monthly")
    LIFETIME = "lifetime", _("lifetime")


class ApiKey(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(_("name"), max_length=100, blank=True)
    prefix = models.CharField(
        _("prefix"), max_length=VISIBLE_PREFIX_LENGTH, db_index=True, editable=False
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    enabled = models.BooleanField(_("enabled"), default=True)
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True)
    allowed_models = models.JSONField(
        _("allowed models"),
        default=list,
        blank=True,
        help_text=_("Public model names this key may use; empty means every enabled model."),
    )
    is_web_key = models.BooleanField(
        _("web key"), default=False, help_text=_("The user's browser-chat key.")
    )

    # Limits and budgets; empty means none.  Enforced atomically by keys.limiter.
    rpm = models.PositiveIntegerField(_("requests per minute"), null=True, blank=True)
    rpd = models.PositiveIntegerField(_("requests per day"), null=True, blank=True)
    tpm = models.PositiveBigIntegerField(_("tokens per minute"), null=True, blank=True)
    tpd = models.PositiveBigIntegerField(_("tokens per day"), null=True, blank=True)
    concurrency = models.PositiveIntegerField(_("concurrent requests"), null=True, blank=True)
    token_budget = models.PositiveBigIntegerField(_("token budget"), null=True, blank=True)
    money_budget = models.DecimalField(
        _("money budget"), null=True, blank=True, max_digits=24, decimal_places=12
    )
    budget_period = models.CharField(
        _("budget period"),
        max_length=10,
        choices=BudgetPeriod.choices,
        default=BudgetPeriod.MONTHLY,
    )
    max_output_tokens = models.PositiveIntegerField(
        _("max output tokens per request"), null=True, blank=True
    )
    clamp_max_tokens = models.BooleanField(
        _("clamp max_tokens"),
        default=False,
        help_text=_(
            "Lower a larger max_tokens to the key's limit instead of refusing the request."
        ),
    )
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    last_used_at = models.DateTimeField(_("last used at"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked at"), null=True, blank=True)
    # Set when the key was rotated: the key that took its place (the old one stays
    # usable until its expiry, the rotation's grace period, then stops).
    replaced_by = models.ForeignKey(
        "self",
        verbose_name=_("replaced by"),
        null=True,
        blank=True,
        editable=False,
        on_delete=models.SET_NULL,
        related_name="replaces",
    )

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        # The console's filters: status (revoked, expired or expiring soon).  The user
        # filter uses the foreign key's own index; lists page by the primary key.
        indexes = [
            models.Index(fields=["revoked_at"], name="apikey_revoked_at"),
            models.Index(fields=["expires_at"], name="apikey_expires_at"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["user"], condition=models.Q(is_web_key=True), name="one_web_key_per_user"
            )
        ]
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    @classmethod
    def issue(cls, *, user: Any, name: str = "", **fields: Any) -> tuple[ApiKey, str]:
        """A new key and its full secret, which is shown once and never stored."""
        raw = generate_key()
        key = cls.objects.create(
            user=user,
            name=name,
            prefix=raw[:VISIBLE_PREFIX_LENGTH],
            key_hash=hash_key(raw),
            **fields,
        )
        return key, raw

    @property
    def limits(self) -> Limits:
        """The key's limits and budgets, as the limiter applies them."""
        from keys.limiter import Limits

        return Limits(
            rpm=self.rpm,
            rpd=self.rpd,
            tpm=self.tpm,
            tpd=self.tpd,
            concurrency=self.concurrency,
            token_budget=self.token_budget,
            money_budget=self.money_budget,
            period=self.budget_period,
            max_output_tokens=self.max_output_tokens,
            clamp_max_tokens=self.clamp_max_tokens,
        )

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if not self.enabled:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class UsageStatus(models.TextChoices):
    OK = "ok", _("ok")
    ERROR = "error", _("error")
    CLIENT_DISCONNECTED = "client_disconnected", _("client disconnected")
    STOPPED = "stopped", _("stopped by the user")
    INTERRUPTED = "interrupted", _("interrupted by a server shutdown")


class UsageRecord(models.Model):
    """One row per relayed request, whatever its outcome."""

    created_at = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    # Unique by a constraint, not unique=True: on PostgreSQL that would add a second,
    # pattern-matching index the size of the first, which nothing reads (request ids
    # are looked up whole) and every insert would keep up.
    request_id = models.CharField(max_length=64)
    # No index of their own (db_index=False): (user, id) and (key, id) below serve
    # every lookup by user or key.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="usage_records",
        db_index=False,
    )
    key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, related_name="usage_records", db_index=False
    )
    endpoint = models.CharField(max_length=32)  # chat.completions, messages, embeddings, browser
    dialect = models.CharField(max_length=16)  # openai, anthropic, browser
    model = models.CharField(max_length=128)  # the public name the client asked for
    provider = models.CharField(max_length=64, blank=True)
    route_id = models.BigIntegerField(null=True, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    stream = models.BooleanField(default=False)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # Input tokens written to the provider's prompt cache (part of input_tokens).
    # (db_default too: bulk loads by COPY name only the columns they fill.)
    cache_write_tokens = models.PositiveIntegerField(default=0, db_default=0)
    estimated = models.BooleanField(
        default=False, help_text=_("Token counts are a local estimate: the upstream reported none.")
    )
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_type = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Prices applied (per 1M tokens) and the cost, fixed at request time: a later
    # price change never rewrites history.  priced=False: the model had no price.
    input_price = models.DecimalField(default=0, max_digits=24, decimal_places=12)
    output_price = models.DecimalField(default=0, max_digits=24, decimal_places=12)
    cached_input_price = models.DecimalField(default=0, max_digits=24, decimal_places=12)
    cache_write_price = models.DecimalField(
        default=0, db_default=0, max_digits=24, decimal_places=12
    )
    cost = models.DecimalField(default=0, max_digits=24, decimal_places=12)
    currency = models.CharField(max_length=8, blank=True)
    priced = models.BooleanField(default=False)
    # What the provider charges us for this request (the route's upstream price at
    # request time); cost - upstream_cost is the margin.  0 when the route has no price.
    upstream_cost = models.DecimalField(default=0, max_digits=24, decimal_places=12)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        # Every relayed request writes each index, and a bulk load rebuilds them all:
        # time ranges go by created_at (the planner weighs it against the others, so
        # SQLite needs ANALYZE as PostgreSQL does); the request log filtered by user,
        # key or model pages by id, newest first, in these.
        indexes = [
            models.Index(fields=["user", "id"], name="usage_record_user_id"),
            models.Index(fields=["key", "id"], name="usage_record_key_id"),
            models.Index(fields=["model", "id"], name="usage_record_model_id"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="usage_record_request_id"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status}"


class ModelPrice(models.Model):
    """A model's price from ``effective_from`` on; history is kept, rows are never edited."""

    model = models.ForeignKey(
        "chatapp.CatalogModel", on_delete=models.CASCADE, related_name="prices"
    )
    input_per_mtok = models.DecimalField(_("input per 1M tokens"), max_digits=24, decimal_places=12)
    output_per_mtok = models.DecimalField(
        _("output per 1M tokens"), max_digits=24, decimal_places=12
    )
    cached_input_per_mtok = models.DecimalField(
        _("cached input per 1M tokens"),
        null=True,
        blank=True,
        help_text=_("Empty: the input price."),
        max_digits=24,
        decimal_places=12,
    )
    cache_write_per_mtok = models.DecimalField(
        _("cache write per 1M tokens"),
        null=True,
        blank=True,
        help_text=_(
            "Input written to the provider's prompt cache (Anthropic). Empty: the input price."
        ),
        max_digits=24,
        decimal_places=12,
    )
    currency = models.CharField(max_length=8)
    effective_from = models.DateTimeField(_("effective from"), default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from", "-id"]
        indexes = [models.Index(fields=["model", "effective_from"])]

    def __str__(self) -> str:
        return f"{self.model}: {self.input_per_mtok}/{self.output_per_mtok} {self.currency} per 1M from {self.effective_from:%Y-%m-%d %H:%M}"


class KeyPolicy(models.Model):
    """What a member may give themselves when they create their own keys.

    Members' own keys (``SWITCHBOARD_MEMBER_KEYS``) get the default limits, never
    above these caps; empty means no cap.  Admins' keys for a user are not capped.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="key_policy"
    )
    max_keys = models.PositiveIntegerField(
        _("max keys"),
        default=5,
        help_text=_("Usable keys the member may hold at once (the chat's own key not counted)."),
    )
    rpm = models.PositiveIntegerField(_("max requests per minute"), null=True, blank=True)
    rpd = models.PositiveIntegerField(_("max requests per day"), null=True, blank=True)
    tpm = models.PositiveBigIntegerField(_("max tokens per minute"), null=True, blank=True)
    tpd = models.PositiveBigIntegerField(_("max tokens per day"), null=True, blank=True)
    concurrency = models.PositiveIntegerField(_("max concurrent requests"), null=True, blank=True)
    token_budget = models.PositiveBigIntegerField(_("max token budget"), null=True, blank=True)
    money_budget = models.DecimalField(
        _("max money budget"), null=True, blank=True, max_digits=24, decimal_places=12
    )
    updated_at = models.DateTimeField(auto_now=True)

    CAPPED = ("rpm", "rpd", "tpm", "tpd", "concurrency", "token_budget", "money_budget")

    class Meta:
        verbose_name = _("key policy")
        verbose_name_plural = _("key policies")

    def __str__(self) -> str:
        return f"key policy of {self.user}"


# --- Usage roll-ups (keys.rollups): the ledger aggregated per 15-minute UTC bucket. ---

BUCKET_SECONDS = 900  # 15 minutes divides every time zone's offset: local hours/days are exact
# Fixed histogram bounds (ms, upper bounds inclusive); one more column counts what lies above.
LATENCY_BOUNDS_MS = (100, 250, 500, 1000, 2000, 4000, 8000, 15000, 30000, 60000, 120000)
TTFT_BOUNDS_MS = (50, 100, 250, 500, 1000, 2000, 4000, 8000, 15000, 30000)
LATENCY_COLUMNS = tuple(f"latency_le_{bound}" for bound in LATENCY_BOUNDS_MS) + ("latency_over",)
TTFT_COLUMNS = tuple(f"ttft_le_{bound}" for bound in TTFT_BOUNDS_MS) + ("ttft_over",)
COST_SCALE = 12  # UsageRecord.cost's decimal places: roll-ups count cost in 10**-12 units


class UsageSource(models.TextChoices):
    API = "api", _("API")
    BROWSER = "browser", _("browser")


class StatusClass(models.TextChoices):
    """One class per record: ``errors by kind`` are the roll-up rows of each class."""

    OK = "ok", _("ok")
    CANCELLED = "cancelled", _("cancelled")  # client disconnected or stopped by the user
    INTERRUPTED = "interrupted", _("interrupted")  # server shutdown
    RATE_LIMITED = "rate_limited", _("rate limited")  # HTTP 429
    CLIENT_ERROR = "client_error", _("client error")  # other 4xx
    UPSTREAM_ERROR = "upstream_error", _("upstream error")  # 5xx and anything else


class UsageRollup(models.Model):
    """Usage of one 15-minute UTC bucket × user × key × model × provider × route × source ×
    status class.  Rows are only ever written by ``keys.rollups.recompute`` (a bucket's rows
    are replaced as a whole from one GROUP BY over the ledger), never edited.

    Cost is an integer of 10⁻¹² currency units: exact on PostgreSQL and SQLite alike
    (SQLite keeps decimals as floats) and summed as integers.
    """

    bucket_start = models.DateTimeField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
        db_index=False,
    )
    key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, related_name="+", db_index=False
    )
    model = models.CharField(max_length=128)
    provider = models.CharField(max_length=64, blank=True)
    route_id = models.BigIntegerField(null=True, blank=True)
    source = models.CharField(max_length=8, choices=UsageSource.choices)
    status_class = models.CharField(max_length=16, choices=StatusClass.choices)

    requests = models.PositiveIntegerField(default=0)
    streamed = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cost_units = models.BigIntegerField(default=0)
    upstream_cost_units = models.BigIntegerField(default=0)
    # Data-quality counts (finance reports flag them): token counts estimated locally,
    # requests with tokens of a model without a price, requests with tokens costing 0.
    estimated = models.PositiveIntegerField(default=0)
    unpriced = models.PositiveIntegerField(default=0)
    zero_cost = models.PositiveIntegerField(default=0)
    latency_sum_ms = models.PositiveBigIntegerField(default=0)
    ttft_count = models.PositiveIntegerField(default=0)
    ttft_sum_ms = models.PositiveBigIntegerField(default=0)
    # Histograms: requests per latency / time-to-first-token range (non-cumulative).
    for _column in LATENCY_COLUMNS + TTFT_COLUMNS:
        locals()[_column] = models.PositiveIntegerField(default=0)
    del _column

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=[
                    "bucket_start",
                    "user",
                    "key",
                    "model",
                    "provider",
                    "route_id",
                    "source",
                    "status_class",
                ],
                name="usage_rollup_dimensions",
            )
        ]
        # The unique constraint's index (bucket_start first) serves time-range reads;
        # members' dashboards read by user, key pages by key.
        indexes = [
            models.Index(fields=["user", "bucket_start"], name="usage_rollup_user"),
            models.Index(fields=["key", "bucket_start"], name="usage_rollup_key"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.bucket_start:%Y-%m-%d %H:%M} {self.model} {self.status_class}: {self.requests}"
        )


class UsageRollupState(models.Model):
    """The roll-ups' bookkeeping: one row (pk=1), locked by every roll-up and retention run.

    ``watermark_id``: every ledger row with an id at or below it is in the roll-ups (its
    bucket was recomputed after the row committed).  A catch-up that takes several runs
    (``max_buckets`` each) is a scan: the dirty buckets of ids in (watermark, ``scan_high``],
    done in bucket order from ``scan_next``; the watermark moves when the scan completes.
    ``unrolled_from``: buckets from this start on may hold rows at or below the watermark
    that are not rolled up yet (they were open at the last scan): read raw, and rolled
    up by the next scan once closed.
    ``raw_kept_from``: retention deleted the raw rows before this bucket start; those
    buckets are sealed and never recomputed.
    """

    watermark_id = models.BigIntegerField(default=0)
    scan_high = models.BigIntegerField(null=True, blank=True)
    scan_next = models.DateTimeField(null=True, blank=True)
    unrolled_from = models.DateTimeField(null=True, blank=True)
    raw_kept_from = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"usage roll-ups through id {self.watermark_id}"


# --- Upstream prices per route, and budget alerts (issue 13). ---


class RoutePrice(models.Model):
    """What the provider charges us for one route, per 1M tokens, from ``effective_from`` on.

    History like ``ModelPrice``: rows are added, never edited.  Each usage record keeps
    the upstream cost computed at request time (``UsageRecord.upstream_cost``), so a
    later price never rewrites it; cost - upstream cost is the margin.
    """

    route = models.ForeignKey(
        "chatapp.Route", on_delete=models.CASCADE, related_name="upstream_prices"
    )
    input_per_mtok = models.DecimalField(_("input per 1M tokens"), max_digits=24, decimal_places=12)
    output_per_mtok = models.DecimalField(
        _("output per 1M tokens"), max_digits=24, decimal_places=12
    )
    cached_input_per_mtok = models.DecimalField(
        _("cached input per 1M tokens"),
        null=True,
        blank=True,
        help_text=_("Empty: the input price."),
        max_digits=24,
        decimal_places=12,
    )
    cache_write_per_mtok = models.DecimalField(
        _("cache write per 1M tokens"),
        null=True,
        blank=True,
        help_text=_(
            "Input written to the provider's prompt cache (Anthropic). Empty: the input price."
        ),
        max_digits=24,
        decimal_places=12,
    )
    currency = models.CharField(max_length=8)
    effective_from = models.DateTimeField(_("effective from"), default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["route", "-effective_from", "-id"]
        indexes = [models.Index(fields=["route", "effective_from"])]
        verbose_name = _("upstream price")
        verbose_name_plural = _("upstream prices")

    def __str__(self) -> str:
        return f"route {self.route_id}: {self.input_per_mtok}/{self.output_per_mtok} {self.currency} per 1M from {self.effective_from:%Y-%m-%d %H:%M}"


class AlertThresholds(models.Model):
    """Soft budget thresholds, in percent of a budget, of one key or of one user's keys.

    A key's own (non-empty) list wins; otherwise its owner's applies to each of their
    keys that has a budget.  Crossing one records a ``BudgetAlert`` (keys.alerts).
    """

    key = models.OneToOneField(
        ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="alert_thresholds"
    )
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="alert_thresholds",
    )
    percents = models.JSONField(_("alert thresholds (%)"), default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(key__isnull=True, user__isnull=False)
                | models.Q(key__isnull=False, user__isnull=True),
                name="alert_thresholds_key_or_user",
            )
        ]
        verbose_name = _("alert thresholds")
        verbose_name_plural = _("alert thresholds")

    def __str__(self) -> str:
        owner = f"key {self.key_id}" if self.key_id else f"user {self.user_id}"
        return f"alert thresholds of {owner}: {', '.join(f'{p}%' for p in self.percents)}"


class BudgetKind(models.TextChoices):
    TOKENS = "tokens", _("token budget")
    MONEY = "money", _("money budget")


class BudgetAlert(models.Model):
    """A key's spending crossed a threshold of one of its budgets in one budget period.

    Unique per (key, budget kind, period start, threshold): however many workers see
    the crossing at once, the database keeps one row, and only the worker whose insert
    won sends the email.
    """

    key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="budget_alerts")
    # The key's owner, kept on the row: members' lists filter on it (indexed).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="budget_alerts"
    )
    kind = models.CharField(_("budget"), max_length=8, choices=BudgetKind.choices)
    period = models.CharField(_("budget period"), max_length=10, choices=BudgetPeriod.choices)
    period_start = models.DateTimeField(_("period start"))
    threshold = models.PositiveSmallIntegerField(_("threshold (%)"))
    budget = models.DecimalField(_("budget"), max_digits=24, decimal_places=12)
    spent = models.DecimalField(_("spent"), max_digits=24, decimal_places=12)
    created_at = models.DateTimeField(_("time"), default=timezone.now)
    emailed_at = models.DateTimeField(_("emailed at"), null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["key", "kind", "period_start", "threshold"], name="one_alert_per_threshold"
            )
        ]
        indexes = [models.Index(fields=["user", "id"], name="budget_alert_user")]
        verbose_name = _("budget alert")
        verbose_name_plural = _("budget alerts")

    def __str__(self) -> str:
        return f"key {self.key_id}: {self.kind} budget past {self.threshold}% ({self.period_start:%Y-%m-%d})"

    @property
    def share(self) -> Decimal:
        """Spent as a percentage of the budget, to one decimal place."""
        if not self.budget:
            return Decimal(0)
        return (self.spent * 100 / self.budget).quantize(Decimal("0.1"))


# --- Monthly statements, closed months and adjustments (issue 13; keys.statements). ---


class StatementMonth(models.Model):
    """One calendar month of statements, in the reporting time zone it was produced in.

    Produced once (``month`` is unique: two runs of the task meet on this row); while
    open it may be produced again (late records), once closed never: a correction is
    then an ``Adjustment``.
    """

    month = models.DateField(_("month"), unique=True)  # its first day
    zone = models.CharField(_("time zone"), max_length=64)
    currency = models.CharField(max_length=8)
    produced_at = models.DateTimeField(_("produced at"), null=True, blank=True)
    closed_at = models.DateTimeField(_("closed at"), null=True, blank=True)
    closed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("closed by"),
    )

    class Meta:
        ordering = ["-month"]
        verbose_name = _("statement month")
        verbose_name_plural = _("statement months")

    def __str__(self) -> str:
        return f"{self.month:%Y-%m}"

    @property
    def is_closed(self) -> bool:
        return self.closed_at is not None


class Statement(models.Model):
    """A month's statement: one per user with usage, and one summary (``user`` empty).

    Its files are kept in the database (every worker serves them; no shared disk),
    exactly as they were produced.
    """

    month = models.ForeignKey(StatementMonth, on_delete=models.CASCADE, related_name="statements")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,  # a statement outlives nothing it names
        related_name="statements",
    )
    requests = models.PositiveBigIntegerField(default=0)
    failed = models.PositiveBigIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=24, decimal_places=12, default=Decimal(0))
    upstream_cost = models.DecimalField(max_digits=24, decimal_places=12, default=Decimal(0))
    csv_file = models.BinaryField()
    xlsx_file = models.BinaryField()
    produced_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["month", "user__email"]
        constraints = [
            models.UniqueConstraint(
                fields=["month", "user"],
                condition=models.Q(user__isnull=False),
                name="one_statement_per_user_and_month",
            ),
            models.UniqueConstraint(
                fields=["month"],
                condition=models.Q(user__isnull=True),
                name="one_summary_per_month",
            ),
        ]
        verbose_name = _("statement")
        verbose_name_plural = _("statements")

    def __str__(self) -> str:
        who = self.user.email if self.user_id and self.user else "summary"
        return f"statement {self.month} {who}"


class Adjustment(models.Model):
    """A dated correction of a month's statement, with its reason: added, never edited.

    ``user`` empty: an adjustment of the whole month (the summary only); otherwise of
    that user's statement (and so of the summary too).
    """

    month = models.ForeignKey(StatementMonth, on_delete=models.PROTECT, related_name="adjustments")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        verbose_name=_("user"),
    )
    amount = models.DecimalField(_("amount"), max_digits=24, decimal_places=12)
    reason = models.CharField(_("reason"), max_length=500)
    created_at = models.DateTimeField(_("date"), default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("by"),
    )

    class Meta:
        ordering = ["month", "created_at", "id"]
        verbose_name = _("adjustment")
        verbose_name_plural = _("adjustments")

    def __str__(self) -> str:
        return f"adjustment of {self.month}: {self.amount.normalize():f} ({self.reason[:40]})"
