"""Strict parsers for the environment variables that drive ``settings.py``.

Every parser names the variable and the expected form when a value is junk, so a
typo like ``DEBUG=yes please`` stops the process with one clear line instead of
silently turning into ``False``.  Secrets may also be given as ``NAME_FILE``: the
path of a file holding the value (Docker/Kubernetes secrets).
"""

from __future__ import annotations

import ipaddress
import os
import zoneinfo
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Env:
    """Reads variables from a mapping (``os.environ`` by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        """The value of ``name``, or of the file named by ``name_FILE``; None when unset.

        An empty value counts as unset, so ``FOO=`` in a compose file means "default".
        """
        value = self.environ.get(name)
        file_name = self.environ.get(f"{name}_FILE")
        if value not in (None, "") and file_name:
            raise ImproperlyConfigured(f"{name}: set either {name} or {name}_FILE, not both")
        if file_name:
            try:
                return Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ImproperlyConfigured(
                    f"{name}_FILE: cannot read {file_name!r} ({exc.strerror})"
                ) from exc
        if value is None or value == "":
            return None
        return value

    def string(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a boolean: expected one of true/false, 1/0, yes/no, on/off"
        )

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
        if minimum is not None and number < minimum:
            raise ImproperlyConfigured(f"{name}={number} is too small: expected at least {minimum}")
        return number

    def decimal(self, name: str, default: Decimal) -> Decimal:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ImproperlyConfigured(f"{name}={value!r} is not a decimal number") from None

    def csv(self, name: str, default: list[str]) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default)
        return [item.strip() for item in value.split(",") if item.strip()]

    def choice(self, name: str, default: str, choices: list[str]) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise ImproperlyConfigured(
                f"{name}={value!r} is not supported: expected one of {', '.join(choices)}"
            )
        return value

    def time_zone(self, name: str, default: str) -> str:
        value = self.string(name, default)
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ImproperlyConfigured(
                f"{name}={value!r} is not a time zone: expected an IANA name such as UTC or Asia/Shanghai"
            ) from None
        return value

    def origins(self, name: str) -> list[str]:
        origins = self.csv(name, [])
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ImproperlyConfigured(
                    f"{name}: {origin!r} is not an origin: expected scheme://host[:port], e.g. https://chat.example.com"
                )
        return origins

    def url(self, name: str) -> str | None:
        """An absolute http(s) URL without query or fragment (trailing slash dropped); None when unset."""
        value = self.raw(name)
        if value is None:
            return None
        parts = urlsplit(value.strip())
        try:
            parts.port  # noqa: B018 - raises ValueError on a junk port
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid or parts.query or parts.fragment or " " in value.strip():
            raise ImproperlyConfigured(
                f"{name}={value!r} is not a URL: expected http(s)://host[:port][/path], "
                "e.g. https://llm.example.com"
            )
        return value.strip().rstrip("/")

    def networks(self, name: str) -> list[str]:
        """Comma-separated IP addresses and CIDR networks, e.g. ``127.0.0.1,10.0.0.0/8``."""
        networks = []
        for item in self.csv(name, []):
            try:
                networks.append(str(ipaddress.ip_network(item)))
            except ValueError as exc:
                raise ImproperlyConfigured(
                    f"{name}: {item!r} is not an IP address or network ({exc}): "
                    "expected comma-separated addresses or CIDRs such as 127.0.0.1,10.0.0.0/8"
                ) from None
        return networks

    def directory(self, name: str) -> Path | None:
        """A directory this process writes to, created when missing; None when unset.

        Read from the variable itself (no ``_FILE``), and an empty value is an error:
        libraries such as prometheus_client read the variable as given.
        """
        value = self.environ.get(name)
        if value is None:
            return None
        if not value.strip():
            raise ImproperlyConfigured(f"{name} is empty: unset it, or give a directory")
        path = Path(value)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImproperlyConfigured(
                f"{name}: cannot create the directory {value!r} ({exc.strerror})"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ImproperlyConfigured(f"{name}: the directory {value!r} is not writable")
        return path

    def database(self, name: str) -> dict[str, Any] | None:
        """``postgres://user:pass@host:port/db`` (or ``sqlite:///path``) as a DATABASES entry."""
        value = self.raw(name)
        if value is None:
            return None
        import dj_database_url

        parts = urlsplit(value)
        if parts.scheme not in ("postgres", "postgresql", "pgsql", "sqlite"):
            raise ImproperlyConfigured(
                f"{name} has an unsupported scheme {parts.scheme!r}: expected "
                "postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME or sqlite:///PATH"
            )
        if parts.scheme != "sqlite" and not parts.path.strip("/"):
            raise ImproperlyConfigured(
                f"{name} names no database: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
            )
        try:
            config: dict[str, Any] = dict(dj_database_url.parse(value))
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"{name} is malformed ({exc}): expected postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
            ) from None
        return config

    def redis_url(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises ValueError on a junk port
            database = parts.path.strip("/")
        except ValueError:
            database = "junk"
        valid = parts.scheme in ("redis", "rediss") and bool(parts.hostname)
        valid = valid or (parts.scheme == "unix" and bool(parts.path))
        if parts.scheme != "unix" and database and not database.isdigit():
            valid = False
        if not valid:
            raise ImproperlyConfigured(
                f"{name}={value!r} is malformed: expected redis://[:PASSWORD@]HOST[:PORT][/DB], "
                "rediss://... or unix:///path/to/socket"
            )
        return value

    def email(self, name: str) -> dict[str, Any] | None:
        """``smtp://[USER[:PASSWORD]@]HOST[:PORT][/?tls=1|ssl=1&timeout=S]`` (or ``smtps://``,
        implicit TLS) as Django's ``EMAIL_*`` settings; None when unset.

        ``tls=1`` is STARTTLS (port 587 by default), ``smtps://`` or ``ssl=1`` TLS from
        the first byte (465); plain ``smtp://`` defaults to port 25.  User name and
        password are percent-decoded (``%40`` for an ``@`` in a user name).
        """
        value = self.raw(name)
        if value is None:
            return None
        expected = (
            "expected smtp://[USER[:PASSWORD]@]HOST[:PORT][/?tls=1] or "
            "smtps://[USER[:PASSWORD]@]HOST[:PORT]"
        )
        parts = urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name} has a malformed port: {expected}") from None
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ImproperlyConfigured(f"{name} is malformed: {expected}")
        if parts.path.strip("/") or parts.fragment:
            raise ImproperlyConfigured(f"{name} has a path: {expected}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"tls", "ssl", "timeout"})
        if unknown:
            raise ImproperlyConfigured(
                f"{name} has an unknown option {unknown[0]!r}: expected tls, ssl or timeout"
            )

        def option(key: str) -> str | None:
            return query[key][-1] if key in query else None

        flags = {}
        for key in ("tls", "ssl"):
            text = (option(key) or "0").strip().lower()
            if text not in _TRUE | _FALSE:
                raise ImproperlyConfigured(f"{name}: {key}={text!r} is not a boolean (1 or 0)")
            flags[key] = text in _TRUE
        use_ssl = flags["ssl"] or parts.scheme == "smtps"
        if use_ssl and flags["tls"]:
            raise ImproperlyConfigured(
                f"{name}: tls=1 (STARTTLS) and implicit TLS (smtps:// or ssl=1) exclude each other"
            )
        timeout_text = option("timeout") or "10"
        if not timeout_text.isdigit() or int(timeout_text) < 1:
            raise ImproperlyConfigured(
                f"{name}: timeout={timeout_text!r} is not a whole number of seconds"
            )
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": parts.hostname,
            "EMAIL_PORT": port or (465 if use_ssl else 587 if flags["tls"] else 25),
            "EMAIL_HOST_USER": unquote(parts.username or ""),
            "EMAIL_HOST_PASSWORD": unquote(parts.password or ""),
            "EMAIL_USE_TLS": flags["tls"],
            "EMAIL_USE_SSL": use_ssl,
            "EMAIL_TIMEOUT": int(timeout_text),
        }
