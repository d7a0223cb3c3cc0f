"""Switchboard's one settings module, driven by environment variables.

With no configuration at all the project runs on one machine: SQLite in the data
directory, an in-memory channel layer, a local-memory cache and Celery tasks run
eagerly.  ``DATABASE_URL`` switches to PostgreSQL, ``REDIS_URL`` to Redis for the
channel layer, the cache, the rate limiter and the Celery broker.  Every variable is
listed in the README's configuration table.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

from chatapp.environ import Env

env = Env()

BASE_DIR = Path(__file__).resolve().parent.parent

# --- Data directory: the SQLite database, generated secrets, uploaded media. ---
DATA_DIR = Path(env.string("SWITCHBOARD_DATA_DIR", str(BASE_DIR / "data"))).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(
        f"SWITCHBOARD_DATA_DIR: cannot create {str(DATA_DIR)!r} ({exc.strerror})"
    ) from exc


def _persisted_secret(name: str, generate: str) -> str:
    """A secret generated on first start and kept in the data directory.

    Written with O_EXCL so that two processes starting at once agree on one value.
    """
    path = DATA_DIR / name
    try:
        with path.open("x", encoding="utf-8") as handle:
            handle.write(generate)
        path.chmod(0o600)
    except FileExistsError:
        pass
    return path.read_text(encoding="utf-8").strip()


SECRET_KEY = env.raw("SECRET_KEY") or _persisted_secret("secret_key", secrets.token_urlsafe(50))

DEBUG = env.flag("DEBUG", False)
ALLOWED_HOSTS = env.csv("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.origins("CSRF_TRUSTED_ORIGINS")

# Fernet key that encrypts upstream provider credentials at rest.  It lives in the
# environment (or the data directory), never in the database it protects.
SWITCHBOARD_ENCRYPTION_KEY = env.raw("SWITCHBOARD_ENCRYPTION_KEY") or _persisted_secret(
    "encryption_key", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "accounts",
    "keys",
    "chatapp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "accounts.audit.AuditMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatapp.security.content_security_policy",
    "django_htmx.middleware.HtmxMiddleware",
    # Without a Celery beat: the first request after a month turns produces its statements.
    "keys.statements.StatementsMiddleware",
]

ROOT_URLCONF = "chatapp.urls"
ASGI_APPLICATION = "chatapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.console.navigation",
            ],
        },
    },
]

# --- Database: SQLite in the data directory, or PostgreSQL from DATABASE_URL. ---
_database = env.database("DATABASE_URL")
if _database is None:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "switchboard.sqlite3",
            # WAL lets the chat's writers and the dashboards' readers overlap; the
            # timeout rides out the short write locks of concurrent requests.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # One connection per thread, kept: opening one (and its PRAGMAs) on every
            # request and chat message was a quarter of a busy chat worker's time.
            "CONN_MAX_AGE": None,
            # Tests use a file too (not Django's in-memory default): threads and the
            # live servers then lock it the way production does, waiting, not failing.
            "TEST": {"NAME": str(DATA_DIR / "test.sqlite3")},
        }
    }
else:
    if _database["ENGINE"] == "django.db.backends.postgresql":
        # Under ASGI every request runs its ORM work in a worker thread; a psycopg
        # connection pool reuses connections across them (persistent connections
        # via CONN_MAX_AGE would pin one per thread).
        _database["CONN_MAX_AGE"] = 0
        _database["CONN_HEALTH_CHECKS"] = False
        _database.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env.integer("DATABASE_POOL_MIN", 1, minimum=0),
            "max_size": env.integer("DATABASE_POOL_MAX", 16, minimum=1),
            "timeout": 10,
        }
    DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channel layer, cache, rate limiter, Celery broker. ---
REDIS_URL = env.redis_url("REDIS_URL")
CHANNEL_LAYERS: dict[str, dict[str, Any]]
if REDIS_URL is None:
    CHANNEL_LAYERS = {"default": {"BACKEND": "chatapp.layers.InMemoryChannelLayer"}}
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "switchboard",
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chatapp.layers.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "switchboard:channels:"},
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "switchboard",
        }
    }

# --- Email (budget alerts): only when EMAIL_URL is set; otherwise notifications only. ---
_email = env.email("EMAIL_URL")
SWITCHBOARD_EMAIL = _email is not None
if _email is not None:
    EMAIL_BACKEND = _email["EMAIL_BACKEND"]
    EMAIL_HOST = _email["EMAIL_HOST"]
    EMAIL_PORT = _email["EMAIL_PORT"]
    EMAIL_HOST_USER = _email["EMAIL_HOST_USER"]
    EMAIL_HOST_PASSWORD = _email["EMAIL_HOST_PASSWORD"]
    EMAIL_USE_TLS = _email["EMAIL_USE_TLS"]
    EMAIL_USE_SSL = _email["EMAIL_USE_SSL"]
    EMAIL_TIMEOUT = _email["EMAIL_TIMEOUT"]
SWITCHBOARD_EMAIL_FROM = env.string("SWITCHBOARD_EMAIL_FROM", "switchboard@localhost")
DEFAULT_FROM_EMAIL = SERVER_EMAIL = SWITCHBOARD_EMAIL_FROM

# --- Celery: eager in the embedded mode, Redis as broker when configured. ---
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = env.flag("CELERY_TASK_ALWAYS_EAGER", REDIS_URL is None)
# No beat runs in the eager mode: the first request after a month turns produces last
# month's statements instead (keys.statements.StatementsMiddleware).
SWITCHBOARD_STATEMENTS_ON_REQUEST = CELERY_TASK_ALWAYS_EAGER
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
# Beat (only with a worker; the embedded mode catches up when dashboards read).
CELERY_BEAT_SCHEDULE = {
    "roll-up-usage": {"task": "keys.tasks.roll_up_usage", "schedule": 60.0},
    "apply-usage-retention": {"task": "keys.tasks.apply_usage_retention", "schedule": 3600.0},
    # Hourly, so the first run after a month turns in any TIME_ZONE produces last month's
    # statements (a beat that was down catches up); every later run finds them produced.
    "monthly-statements": {"task": "keys.tasks.produce_monthly_statements", "schedule": 3600.0},
}
# Raw usage records older than this many days are deleted (roll-ups are kept); unset: keep all.
SWITCHBOARD_USAGE_RETENTION_DAYS: int | None = (
    env.integer("SWITCHBOARD_USAGE_RETENTION_DAYS", 0, minimum=1) or None
)

# --- Authentication. ---
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "accounts:login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Sign-in throttling (accounts/throttle.py): failures per email and address before a pause.
LOGIN_FAILURE_LIMIT = env.integer("SWITCHBOARD_LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_FAILURE_WINDOW = env.integer("SWITCHBOARD_LOGIN_FAILURE_WINDOW", 900, minimum=1)
# Reverse proxies whose X-Forwarded-For is believed for the sign-in throttle's client address.
SWITCHBOARD_TRUSTED_PROXIES = env.networks("SWITCHBOARD_TRUSTED_PROXIES")
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env.flag("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# --- Internationalization: English and Simplified Chinese. ---
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LANGUAGE_CODE = env.choice("LANGUAGE_CODE", "en", [code for code, _name in LANGUAGES])
LOCALE_PATHS = [BASE_DIR / "chatapp" / "locale"]
TIME_ZONE = env.time_zone("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- Static files and media. ---
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Served by the ASGI app straight from the finders (chatapp.asgi): no collectstatic
# step to forget.  Behind a reverse proxy, `collectstatic` fills STATIC_ROOT for it.
STATIC_ROOT = DATA_DIR / "staticfiles"
MEDIA_URL = "media/"
MEDIA_ROOT = DATA_DIR / "media"

# --- The relay. ---
# Largest request body the /v1 API accepts (images travel inline as base64).
SWITCHBOARD_MAX_BODY_BYTES = env.integer(
    "SWITCHBOARD_MAX_BODY_BYTES", 50 * 1024 * 1024, minimum=1024
)
DATA_UPLOAD_MAX_MEMORY_SIZE = SWITCHBOARD_MAX_BODY_BYTES
# Image URLs naming a private, loopback or link-local host (or a name resolving to one)
# are refused: an upstream that fetches URLs itself (vLLM, Ollama) would fetch them
# from inside the network.  Turn on only when every upstream is trusted with that.
SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS = env.flag("SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS", False)
# The API guide (/docs/): shown to anonymous visitors too when on (then without anything
# personal); the base URL its samples use, else the request's own scheme and host.
SWITCHBOARD_PUBLIC_DOCS = env.flag("SWITCHBOARD_PUBLIC_DOCS", False)
SWITCHBOARD_PUBLIC_URL = env.url("SWITCHBOARD_PUBLIC_URL")
# The one currency prices and money budgets are in (ISO 4217 code).
SWITCHBOARD_CURRENCY = env.string("SWITCHBOARD_CURRENCY", "USD").upper()
if not (len(SWITCHBOARD_CURRENCY) == 3 and SWITCHBOARD_CURRENCY.isalpha()):
    raise ImproperlyConfigured(
        f"SWITCHBOARD_CURRENCY={SWITCHBOARD_CURRENCY!r} is not a currency code: expected three letters such as USD or CNY"
    )
# Limits given to every new key (0 = none); each key can be changed afterwards.
SWITCHBOARD_KEY_DEFAULTS = {
    "rpm": env.integer("SWITCHBOARD_DEFAULT_RPM", 60, minimum=0),
    "rpd": env.integer("SWITCHBOARD_DEFAULT_RPD", 0, minimum=0),
    "tpm": env.integer("SWITCHBOARD_DEFAULT_TPM", 0, minimum=0),
    "tpd": env.integer("SWITCHBOARD_DEFAULT_TPD", 0, minimum=0),
    "concurrency": env.integer("SWITCHBOARD_DEFAULT_CONCURRENCY", 0, minimum=0),
    "max_output_tokens": env.integer("SWITCHBOARD_DEFAULT_MAX_OUTPUT", 0, minimum=0),
}
# Members may create and revoke their own API keys in the console (default limits,
# capped by their key policy); off: only admins issue keys.
SWITCHBOARD_MEMBER_KEYS = env.flag("SWITCHBOARD_MEMBER_KEYS", True)
# The local model (the `local` extra): context size, inference threads, queue bound.
SWITCHBOARD_LOCAL_CONTEXT = env.integer("SWITCHBOARD_LOCAL_CONTEXT", 4096, minimum=256)
SWITCHBOARD_LOCAL_THREADS = env.integer("SWITCHBOARD_LOCAL_THREADS", os.cpu_count() or 2, minimum=1)
SWITCHBOARD_LOCAL_QUEUE = env.integer("SWITCHBOARD_LOCAL_QUEUE", 8, minimum=1)
# Title new conversations with their model after the first exchange (else: the first words).
SWITCHBOARD_CHAT_TITLES = env.flag("SWITCHBOARD_CHAT_TITLES", True)
# When a chat tab opens, a connection to each upstream of the chat's models is opened
# ahead, so that its first message skips the TCP and TLS handshakes: one per open tab,
# at most this many idle per upstream per worker (0: none; chatapp.relay.http.preconnect).
SWITCHBOARD_CHAT_PRECONNECT = env.integer("SWITCHBOARD_CHAT_PRECONNECT", 1000, minimum=0)
# Show each reply's cost in the browser chat (tokens are always shown).
SWITCHBOARD_SHOW_COST = env.flag("SWITCHBOARD_SHOW_COST", False)
# A reservation of a request that never settled (its worker died) is released after this.
SWITCHBOARD_RESERVATION_TTL = env.integer("SWITCHBOARD_RESERVATION_TTL", 900, minimum=10)
# With Redis: a worker that stops refreshing its lease this long is dead (keys/leases.py).
SWITCHBOARD_LEASE_SECONDS = env.integer("SWITCHBOARD_LEASE_SECONDS", 10, minimum=1)
# GET /metrics (chatapp/metrics.py): readable with this bearer token or from these
# addresses (IPs, CIDRs); with neither set it is off (404).
SWITCHBOARD_METRICS_TOKEN = env.raw("SWITCHBOARD_METRICS_TOKEN") or ""
SWITCHBOARD_METRICS_ALLOW = env.networks("SWITCHBOARD_METRICS_ALLOW")
# prometheus_client's multiprocess mode (several workers on one host) reads this variable itself.
PROMETHEUS_MULTIPROC_DIR = env.directory("PROMETHEUS_MULTIPROC_DIR")
# On SIGTERM in-flight /v1 requests and chat replies get this long to finish (chatapp/shutdown.py).
SWITCHBOARD_DRAIN_SECONDS = env.integer("SWITCHBOARD_DRAIN_SECONDS", 20, minimum=0)

X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# text: human-readable lines; json: one JSON object per line (chatapp/logs.py).
LOG_FORMAT = env.choice("LOG_FORMAT", "text", ["text", "json"])
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "chatapp.logs.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {
        "handlers": ["console"],
        "level": env.choice("LOG_LEVEL", "INFO", ["DEBUG", "INFO", "WARNING", "ERROR"]),
    },
    "loggers": {
        # Django's own lines go through our handler only (not its DEBUG console as well).
        "django": {"handlers": [], "level": "INFO"},
        "django.request": {"level": "ERROR"},
        # One INFO line per upstream request is noise on the relay's hot path.
        "httpx": {"level": "WARNING"},
    },
}
