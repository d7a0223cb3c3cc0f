"""Turn a configuration error into one line on stderr instead of a traceback."""

from __future__ import annotations

import sys

from django.core.exceptions import ImproperlyConfigured


def load_settings_or_exit() -> None:
    """Evaluate the settings now; on a bad variable print one line and exit 2."""
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 - forces the lazy settings to load
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"switchboard: configuration error: {exc}\n")
        raise SystemExit(2) from None
