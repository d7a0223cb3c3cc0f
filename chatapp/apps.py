from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class ChatappConfig(AppConfig):
    name = "chatapp"
    verbose_name = "Chat and relay"

    def ready(self) -> None:
        # Any catalog change bumps the shared catalog version so every process
        # reloads its cached copy (chatapp.relay.catalog).  Signals only keep that
        # cache coherent; workflows live in actions.
        from django.db.models.signals import post_delete, post_save

        from chatapp.models import CatalogModel, Provider, Route
        from chatapp.relay import catalog
        from keys.models import ModelPrice, RoutePrice

        def changed(**kwargs: Any) -> None:
            catalog.invalidate()

        for model in (Provider, CatalogModel, Route, ModelPrice, RoutePrice):
            # weak=False: the receiver is a closure that nothing else keeps alive.
            post_save.connect(
                changed, sender=model, weak=False, dispatch_uid=f"catalog.save.{model.__name__}"
            )
            post_delete.connect(
                changed, sender=model, weak=False, dispatch_uid=f"catalog.delete.{model.__name__}"
            )
