"""Settings come from the environment and refuse junk with one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from chatapp.environ import Env

ROOT = Path(__file__).resolve().parents[2]


def load_settings(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """Import the settings in a fresh process with exactly ``variables`` set."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "TEST_"))
    }
    env.update({"SWITCHBOARD_DATA_DIR": str(tmp_path / "data"), **variables})
    script = (
        "import json, django; from django.conf import settings; "
        "from chatapp.startup import load_settings_or_exit; load_settings_or_exit(); "
        "print(json.dumps({'db': settings.DATABASES['default'], 'debug': settings.DEBUG, "
        "'secret': settings.SECRET_KEY, 'layer': settings.CHANNEL_LAYERS['default'], "
        "'cache': settings.CACHES['default']['BACKEND'], 'eager': settings.CELERY_TASK_ALWAYS_EAGER, "
        "'broker': settings.CELERY_BROKER_URL, 'tz': settings.TIME_ZONE, "
        "'hosts': settings.ALLOWED_HOSTS, 'lang': settings.LANGUAGE_CODE}, default=str))"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "chatapp.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_configuration_gives_the_embedded_defaults(tmp_path: Path) -> None:
    result = load_settings(tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["db"]["ENGINE"] == "django.db.backends.sqlite3"
    assert loaded["db"]["NAME"] == str(tmp_path / "data" / "switchboard.sqlite3")
    assert loaded["layer"]["BACKEND"] == "chatapp.layers.InMemoryChannelLayer"
    assert loaded["cache"] == "django.core.cache.backends.locmem.LocMemCache"
    assert loaded["eager"] is True
    assert loaded["debug"] is False
    assert loaded["tz"] == "UTC"
    assert loaded["lang"] == "en"


def test_the_generated_secret_key_is_persisted_across_starts(tmp_path: Path) -> None:
    first = json.loads(load_settings(tmp_path).stdout)["secret"]
    second = json.loads(load_settings(tmp_path).stdout)["secret"]
    assert len(first) >= 50
    assert first == second
    assert (tmp_path / "data" / "secret_key").read_text().strip() == first


def test_a_secret_key_can_come_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file-" + "x" * 50 + "\n")
    loaded = json.loads(load_settings(tmp_path, SECRET_KEY_FILE=str(secret_file)).stdout)
    assert loaded["secret"] == "from-a-file-" + "x" * 50


def test_database_url_selects_postgres_with_a_connection_pool(tmp_path: Path) -> None:
    result = load_settings(tmp_path, DATABASE_URL="postgres://sb:pw@db.internal:5433/switchboard")
    loaded = json.loads(result.stdout)
    assert loaded["db"]["ENGINE"] == "django.db.backends.postgresql"
    assert loaded["db"]["NAME"] == "switchboard"
    assert loaded["db"]["HOST"] == "db.internal"
    assert loaded["db"]["PORT"] == 5433
    assert loaded["db"]["OPTIONS"]["pool"]["max_size"] == 16


def test_redis_url_moves_layer_cache_and_broker_to_redis(tmp_path: Path) -> None:
    loaded = json.loads(load_settings(tmp_path, REDIS_URL="redis://cache.internal:6379/2").stdout)
    assert loaded["layer"]["BACKEND"] == "chatapp.layers.RedisPubSubChannelLayer"
    assert loaded["layer"]["CONFIG"]["hosts"] == ["redis://cache.internal:6379/2"]
    assert loaded["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert loaded["broker"] == "redis://cache.internal:6379/2"
    assert loaded["eager"] is False


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DEBUG", "yes please", "DEBUG='yes please' is not a boolean"),
        (
            "DATABASE_URL",
            "mysql://root@localhost/x",
            "DATABASE_URL has an unsupported scheme 'mysql'",
        ),
        ("DATABASE_URL", "postgres://localhost", "DATABASE_URL names no database"),
        ("DATABASE_URL", "postgres://h:notaport/db", "DATABASE_URL is malformed"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL='localhost:6379' is malformed"),
        (
            "REDIS_URL",
            "redis://localhost:6379/cache",
            "REDIS_URL='redis://localhost:6379/cache' is malformed",
        ),
        ("TIME_ZONE", "Mars/Olympus", "TIME_ZONE='Mars/Olympus' is not a time zone"),
        ("LANGUAGE_CODE", "fr", "LANGUAGE_CODE='fr' is not supported"),
        (
            "CSRF_TRUSTED_ORIGINS",
            "chat.example.com",
            "CSRF_TRUSTED_ORIGINS: 'chat.example.com' is not an origin",
        ),
    ],
)
def test_a_bad_value_stops_the_process_with_one_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    result = load_settings(tmp_path, **{variable: value})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith("switchboard: configuration error:")


def test_manage_py_refuses_to_start_on_a_bad_boolean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "SWITCHBOARD_DATA_DIR": str(tmp_path), "DEBUG": "maybe"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "switchboard: configuration error: DEBUG='maybe' is not a boolean: "
        "expected one of true/false, 1/0, yes/no, on/off"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_booleans_accept_the_usual_spellings(value: str, expected: bool) -> None:
    assert Env({"FLAG": value}).flag("FLAG", not expected) is expected


def test_an_empty_value_means_the_default() -> None:
    env = Env({"FLAG": "", "HOSTS": ""})
    assert env.flag("FLAG", True) is True
    assert env.csv("HOSTS", ["a"]) == ["a"]


def test_lists_integers_and_decimals_are_parsed_strictly() -> None:
    env = Env({"HOSTS": " a.example.com, b.example.com ,", "N": "12", "BAD": "1x", "D": "0.10"})
    assert env.csv("HOSTS", []) == ["a.example.com", "b.example.com"]
    assert env.integer("N", 0) == 12
    assert env.decimal("D", Decimal(0)) == Decimal("0.10")
    with pytest.raises(ImproperlyConfigured, match="BAD='1x' is not an integer"):
        env.integer("BAD", 0)
    with pytest.raises(ImproperlyConfigured, match="N=12 is too small: expected at least 20"):
        env.integer("N", 0, minimum=20)


def test_a_variable_and_its_file_twin_cannot_both_be_set(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    with pytest.raises(ImproperlyConfigured, match="set either SECRET_KEY or SECRET_KEY_FILE"):
        Env({"SECRET_KEY": "a", "SECRET_KEY_FILE": str(secret)}).raw("SECRET_KEY")
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY_FILE: cannot read"):
        Env({"SECRET_KEY_FILE": str(tmp_path / "missing")}).raw("SECRET_KEY")
