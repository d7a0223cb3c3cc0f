# Upstream prices per route and budget alerts (issue 13).
import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chatapp", "0005_default_chat_model"),
        ("keys", "0006_usage_rollups"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="RoutePrice",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "input_per_mtok",
                    models.DecimalField(
                        decimal_places=12, max_digits=24, verbose_name="input per 1M tokens"
                    ),
                ),
                (
                    "output_per_mtok",
                    models.DecimalField(
                        decimal_places=12, max_digits=24, verbose_name="output per 1M tokens"
                    ),
                ),
                (
                    "cached_input_per_mtok",
                    models.DecimalField(
                        blank=True,
                        decimal_places=12,
                        help_text="Empty: the input price.",
                        max_digits=24,
                        null=True,
                        verbose_name="cached input per 1M tokens",
                    ),
                ),
                ("currency", models.CharField(max_length=8)),
                (
                    "effective_from",
                    models.DateTimeField(
                        default=django.utils.timezone.now, verbose_name="effective from"
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "route",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="upstream_prices",
                        to="chatapp.route",
                    ),
                ),
            ],
            options={
                "verbose_name": "upstream price",
                "verbose_name_plural": "upstream prices",
                "ordering": ["route", "-effective_from", "-id"],
                "indexes": [
                    models.Index(
                        fields=["route", "effective_from"], name="keys_routep_route_i_02c429_idx"
                    )
                ],
            },
        ),
        migrations.CreateModel(
            name="AlertThresholds",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "percents",
                    models.JSONField(blank=True, default=list, verbose_name="alert thresholds (%)"),
                ),
                ("updated_at", models.DateTimeField(auto_now=True)),
                (
                    "key",
                    models.OneToOneField(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="alert_thresholds",
                        to="keys.apikey",
                    ),
                ),
                (
                    "user",
                    models.OneToOneField(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="alert_thresholds",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "verbose_name": "alert thresholds",
                "verbose_name_plural": "alert thresholds",
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(
                            models.Q(("key__isnull", True), ("user__isnull", False)),
                            models.Q(("key__isnull", False), ("user__isnull", True)),
                            _connector="OR",
                        ),
                        name="alert_thresholds_key_or_user",
                    )
                ],
            },
        ),
        migrations.CreateModel(
            name="BudgetAlert",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "kind",
                    models.CharField(
                        choices=[("tokens", "token budget"), ("money", "money budget")],
                        max_length=8,
                        verbose_name="budget",
                    ),
                ),
                (
                    "period",
                    models.CharField(
                        choices=[
                            ("daily", "daily"),
                            ("weekly", "weekly"),
                            ("monthly", "monthly"),
                            ("lifetime", "lifetime"),
                        ],
                        max_length=10,
                        verbose_name="budget period",
                    ),
                ),
                ("period_start", models.DateTimeField(verbose_name="period start")),
                ("threshold", models.PositiveSmallIntegerField(verbose_name="threshold (%)")),
                (
                    "budget",
                    models.DecimalField(decimal_places=12, max_digits=24, verbose_name="budget"),
                ),
                (
                    "spent",
                    models.DecimalField(decimal_places=12, max_digits=24, verbose_name="spent"),
                ),
                (
                    "created_at",
                    models.DateTimeField(default=django.utils.timezone.now, verbose_name="time"),
                ),
                (
                    "emailed_at",
                    models.DateTimeField(blank=True, null=True, verbose_name="emailed at"),
                ),
                (
                    "key",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="budget_alerts",
                        to="keys.apikey",
                    ),
                ),
                (
                    "user",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="budget_alerts",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "verbose_name": "budget alert",
                "verbose_name_plural": "budget alerts",
                "ordering": ["-id"],
                "indexes": [models.Index(fields=["user", "id"], name="budget_alert_user")],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("key", "kind", "period_start", "threshold"),
                        name="one_alert_per_threshold",
                    )
                ],
            },
        ),
    ]
