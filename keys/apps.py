from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "API keys and usage"

    def ready(self) -> None:
        # Signals here only keep the key cache coherent (keys.auth); workflows live in
        # keys.actions.  Every save path — actions, admin, shell — must invalidate.
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from keys import (
            auth,
            rollups,  # noqa: F401 - defines UsageRollupDay: registered in every process
        )
        from keys.models import ApiKey

        def key_changed(sender: Any, instance: ApiKey, **kwargs: Any) -> None:
            auth.invalidate_key(instance.key_hash)

        def user_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
            auth.invalidate_user_keys(instance.pk)

        post_save.connect(key_changed, sender=ApiKey, weak=False, dispatch_uid="keys.key_changed")
        post_delete.connect(key_changed, sender=ApiKey, weak=False, dispatch_uid="keys.key_deleted")
        post_save.connect(
            user_changed, sender=get_user_model(), weak=False, dispatch_uid="keys.user_changed"
        )
