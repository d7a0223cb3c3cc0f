"""The project's own pages: the home redirect, the health check, and the catalog's console.

The browser chat's pages live in ``chatapp.chat.views``; the ``/v1`` API in
``chatapp.relay.views``.  The console pages here (providers, models, routes) are
thin: a form checks the input, one ``chatapp.actions`` action writes it (and its
audit event), the page renders the result.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import messages
from django.db.models import Count, Prefetch, Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import URLPattern, URLResolver, path, reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect
from django_htmx.middleware import HtmxDetails

from accounts.console import ADMINS, STAFF, keyset_page
from accounts.roles import console_page
from chatapp import actions
from chatapp.forms import AddModelForm, ImportForm, ModelForm, ProviderForm, RouteForm
from chatapp.health import run_checks
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import params, routing
from keys.actions import KeyActionError, do_set_route_price
from keys.forms import ConsoleRoutePriceForm

T = TypeVar("T")


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return redirect("accounts:login")
    return redirect("chat")


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    checks = await run_checks()
    down = [name for name, result in checks.items() if result["status"] != "up"]
    body: dict[str, object] = {"status": "down" if down else "ok", "checks": checks}
    if down:
        body["down"] = down
    return JsonResponse(body, status=503 if down else 200)


# --- The console: providers -------------------------------------------------------------

_STATE_RANK = {name: rank for rank, name in enumerate(routing.BREAKER_STATES)}


@dataclass
class ProviderHealth:
    """A provider's routes as this worker's circuit breakers see them."""

    state: str  # the worst of its routes': closed < half-open < open
    failures: int
    open_routes: int
    last_error: str
    last_latency_ms: int | None


def _provider_health(routes: list[Route]) -> ProviderHealth:
    healths = [routing.health(route.pk) for route in routes]
    state = max((h.state for h in healths), key=_STATE_RANK.__getitem__, default="closed")
    errors = [h.observation for h in healths if h.observation.last_error_at is not None]
    successes = [h.observation for h in healths if h.observation.last_success_at is not None]
    last_error = max(errors, key=lambda seen: seen.last_error_at or 0.0) if errors else None
    last_success = (
        max(successes, key=lambda seen: seen.last_success_at or 0.0) if successes else None
    )
    return ProviderHealth(
        state=state,
        failures=max((h.failures for h in healths), default=0),
        open_routes=sum(1 for h in healths if h.state != "closed"),
        last_error=last_error.last_error if last_error else "",
        last_latency_ms=last_success.last_latency_ms if last_success else None,
    )


def _credential_hint(provider: Provider) -> str:
    """The stored credential's last 4 characters (never more), or "" when none is set."""
    if not provider.api_key_encrypted:
        return ""
    key = provider.api_key
    return key[-4:] if len(key) >= 12 else ""


@require_GET
@console_page(read=ADMINS, write=ADMINS)
def providers(request: HtmxHttpRequest) -> HttpResponse:
    rows = list(
        Provider.objects.annotate(route_count=Count("routes")).prefetch_related(
            Prefetch("routes", queryset=Route.objects.only("id", "provider_id"))
        )
    )
    listed = [(provider, _provider_health(list(provider.routes.all()))) for provider in rows]
    return render(
        request,
        "chatapp/console/provider_list.html",
        {"listed": listed, "pid": os.getpid()},
    )


def _provider_context(provider: Provider, **extra: Any) -> dict[str, Any]:
    routes = list(
        Route.objects.filter(provider=provider).select_related("model").order_by("model__name")
    )
    return {
        "provider": provider,
        "credential_hint": _credential_hint(provider),
        "has_credential": bool(provider.api_key_encrypted),
        "routes": [(route, routing.health(route.pk)) for route in routes],
        "pid": os.getpid(),
        **extra,
    }


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def provider_create(request: HtmxHttpRequest) -> HttpResponse:
    form = ProviderForm(request.POST or None, instance=Provider())
    if request.method == "POST" and form.is_valid():
        try:
            provider = actions.do_add_provider(
                **form.changes(), api_key=form.cleaned_data["api_key"]
            )
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Provider %(name)s added.") % {"name": provider.name})
            return redirect("console:provider", pk=provider.pk)
    return render(
        request,
        "chatapp/console/provider_form.html",
        {"form": form, "provider": None},
        status=400 if form.is_bound else 200,
    )


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def provider(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    stored = get_object_or_404(Provider, pk=pk)
    # The form works on its own copy: a refused form leaves ``stored`` as saved.
    form = ProviderForm(request.POST or None, instance=Provider.objects.get(pk=pk))
    if request.method == "POST" and form.is_valid():
        try:
            stored = actions.do_update_provider(
                provider=stored, changes=form.changes(), api_key=form.cleaned_data["api_key"]
            )
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Provider %(name)s saved.") % {"name": stored.name})
            return redirect("console:provider", pk=stored.pk)
    return render(
        request,
        "chatapp/console/provider_form.html",
        _provider_context(stored, form=form),
        status=400 if form.is_bound else 200,
    )


@require_POST
@console_page(read=ADMINS, write=ADMINS)
def provider_enabled(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    stored = get_object_or_404(Provider, pk=pk)
    enabled = request.POST.get("enabled") == "1"
    actions.do_set_provider_enabled(name=stored.name, enabled=enabled)
    text = _("Provider %(name)s enabled.") if enabled else _("Provider %(name)s disabled.")
    messages.success(request, text % {"name": stored.name})
    back = request.POST.get("next", "")
    # Only back to a console page: never an address someone else chose.
    if not (back.startswith("/console/") and url_has_allowed_host_and_scheme(back, None)):
        back = reverse("console:provider", args=[pk])
    return redirect(back)


@require_POST
@console_page(read=ADMINS, write=ADMINS)
def provider_test(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A tiny real request through the pipeline to this provider: latency, or its error."""
    stored = get_object_or_404(Provider, pk=pk)
    upstream_model = request.POST.get("upstream_model", "").strip()[:200] or None
    result: dict[str, Any] = {}
    try:
        latency, reply = _run_async(
            actions.atest_provider, provider=stored, upstream_model=upstream_model
        )
    except actions.CatalogError as exc:
        result = {"ok": False, "error": str(exc)}
    else:
        result = {"ok": True, "latency_ms": round(latency * 1000), "reply": reply[:200]}
    if request.htmx:
        return render(request, "chatapp/console/provider_form.html#test-result", {"test": result})
    return render(
        request,
        "chatapp/console/provider_form.html",
        _provider_context(stored, form=ProviderForm(instance=stored), test=result),
    )


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def provider_import(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The upstream's own model list; the ones not in the catalog yet, offered for import."""
    stored = get_object_or_404(Provider, pk=pk)
    error = ""
    if request.method == "POST":
        chosen = request.POST.getlist("models")
        form = ImportForm(
            request.POST,
            offered=actions.check_importable(provider=stored, upstream_models=chosen),
        )
        if form.is_valid():
            try:
                added = actions.do_import_models(
                    provider=stored, upstream_models=form.cleaned_data["models"]
                )
            except actions.CatalogError as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(
                    request,
                    _("Added %(names)s, routed to %(provider)s.")
                    % {"names": ", ".join(model.name for model in added), "provider": stored},
                )
                url = reverse("console:provider", args=[pk])
                return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
        listed = chosen
    else:
        try:
            listed = _run_async(actions.alist_models, provider=stored)
        except actions.CatalogError as exc:
            listed, error = [], str(exc)
        form = ImportForm(offered=actions.check_importable(provider=stored, upstream_models=listed))
    offered = [name for name, _label in form.fields["models"].choices]  # type: ignore[attr-defined]
    context = {
        "provider": stored,
        "import_form": form,
        "offered": offered,
        "already": [name for name in listed if name not in offered],
        "import_error": error,
    }
    template = "chatapp/console/provider_import.html"
    if request.htmx:
        template += "#import"
    # htmx swaps only 2xx answers: the refused form comes back as 200 to show its errors.
    refused = form.is_bound and not request.htmx
    return render(request, template, context, status=400 if refused else 200)


# --- The console: models and routes --------------------------------------------------------


def _model_queryset(request: HttpRequest) -> tuple[QuerySet[CatalogModel], dict[str, str]]:
    filters = {
        "q": request.GET.get("q", "").strip()[:100],
        "status": request.GET.get("status", ""),
        "provider": request.GET.get("provider", "").strip()[:64],
    }
    queryset = CatalogModel.objects.annotate(route_count=Count("routes", distinct=True))
    if filters["q"]:
        queryset = queryset.filter(
            Q(name__icontains=filters["q"])
            | Q(display_name__icontains=filters["q"])
            | Q(routes__upstream_model__icontains=filters["q"])
        ).distinct()
    if filters["status"] == "enabled":
        queryset = queryset.filter(enabled=True)
    elif filters["status"] == "disabled":
        queryset = queryset.filter(enabled=False)
    if filters["provider"]:
        queryset = queryset.filter(routes__provider__name=filters["provider"]).distinct()
    return queryset.prefetch_related(
        Prefetch("routes", queryset=Route.objects.select_related("provider"))
    ), filters


@require_GET
@console_page(read=STAFF, write=ADMINS)
def models(request: HtmxHttpRequest) -> HttpResponse:
    queryset, filters = _model_queryset(request)
    context = {
        "page": keyset_page(request, queryset),
        "filters": filters,
        "providers": Provider.objects.order_by("name").values_list("name", flat=True),
        "add_form": AddModelForm(),
    }
    template = "chatapp/console/model_list.html"
    if request.htmx and not request.htmx.boosted:
        template += "#rows"
    return render(request, template, context)


@require_POST
@console_page(read=STAFF, write=ADMINS)
def model_create(request: HtmxHttpRequest) -> HttpResponse:
    form = AddModelForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            model, _route, _created = actions.do_add_model(
                name=data["name"].strip(),
                provider=data["provider"],
                upstream_model=data["upstream_model"],
                priority=data["priority"],
                weight=data["weight"],
            )
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Model %(name)s saved.") % {"name": model.name})
            return redirect("console:model", pk=model.pk)
    queryset, filters = _model_queryset(request)
    context = {
        "page": keyset_page(request, queryset),
        "filters": filters,
        "providers": Provider.objects.order_by("name").values_list("name", flat=True),
        "add_form": form,
    }
    return render(request, "chatapp/console/model_list.html", context, status=400)


def _model_context(model: CatalogModel, **extra: Any) -> dict[str, Any]:
    routes = list(model.routes.select_related("provider").order_by("priority", "-weight", "id"))
    for each in routes:
        each.health = routing.health(each.pk)  # type: ignore[attr-defined]
    return {
        "model": model,
        "routes": routes,
        "route_add_form": AddModelForm(initial={"name": model.name}),
        "rules_text": params.as_text(params.from_json(model.param_rules)),
        **extra,
    }


@require_http_methods(["GET", "POST"])
@console_page(read=STAFF, write=ADMINS)
def model(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    stored = get_object_or_404(CatalogModel, pk=pk)
    form = ModelForm(request.POST or None, instance=CatalogModel.objects.get(pk=pk))
    if request.method == "POST" and form.is_valid():
        try:
            stored = actions.do_update_model(model=stored, changes=form.cleaned_data)
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Model %(name)s saved.") % {"name": stored.name})
            return redirect("console:model", pk=stored.pk)
    editing = _int(request.GET.get("edit"))
    route_form = None
    if editing is not None:
        route = Route.objects.filter(pk=editing, model=stored).first()
        route_form = RouteForm(instance=route, prefix=f"route-{editing}") if route else None
    return render(
        request,
        "chatapp/console/model_detail.html",
        _model_context(stored, form=form, editing=editing, route_form=route_form),
        status=400 if form.is_bound else 200,
    )


@require_POST
@console_page(read=STAFF, write=ADMINS)
def model_enabled(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    stored = get_object_or_404(CatalogModel, pk=pk)
    enabled = request.POST.get("enabled") == "1"
    actions.do_set_model_enabled(name=stored.name, enabled=enabled)
    text = _("Model %(name)s enabled.") if enabled else _("Model %(name)s disabled.")
    messages.success(request, text % {"name": stored.name})
    return redirect("console:model", pk=pk)


@require_POST
@console_page(read=STAFF, write=ADMINS)
def model_route_add(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    stored = get_object_or_404(CatalogModel, pk=pk)
    data = request.POST.copy()
    data["name"] = stored.name  # a route of this model, whatever was posted
    form = AddModelForm(data)
    if form.is_valid():
        try:
            actions.do_add_model(
                name=stored.name,
                provider=form.cleaned_data["provider"],
                upstream_model=form.cleaned_data["upstream_model"],
                priority=form.cleaned_data["priority"],
                weight=form.cleaned_data["weight"],
            )
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Route added."))
            return redirect("console:model", pk=pk)
    return render(
        request,
        "chatapp/console/model_detail.html",
        _model_context(stored, form=ModelForm(instance=stored), route_add_form=form),
        status=400,
    )


@require_http_methods(["GET", "POST"])
@console_page(read=STAFF, write=ADMINS)
def route(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """One route's row: GET its form (htmx: in place), POST saves it and shows the row."""
    stored = get_object_or_404(Route.objects.select_related("model", "provider"), pk=pk)
    model_url = reverse("console:model", args=[stored.model_id])
    if request.method == "GET":
        if request.GET.get("cancel"):
            if not request.htmx:
                return redirect(f"{model_url}#route-{pk}")
            return _route_row(request, stored)
        if not request.htmx:
            return redirect(f"{model_url}?edit={pk}#route-{pk}")
        form = RouteForm(instance=stored, prefix=f"route-{pk}")
        return _route_row(request, stored, form=form)
    form = RouteForm(request.POST, instance=Route.objects.get(pk=pk), prefix=f"route-{pk}")
    if form.is_valid():
        try:
            stored = actions.do_update_route(route=stored, changes=form.changes())
        except actions.CatalogError as exc:
            form.add_error(None, str(exc))
        else:
            if not request.htmx:
                messages.success(request, _("Route saved."))
                return redirect(f"{model_url}#route-{pk}")
            return _route_row(request, stored)
    if request.htmx:
        # 200 so htmx swaps the row with its errors in place.
        return _route_row(request, stored, form=form)
    return render(
        request,
        "chatapp/console/model_detail.html",
        _model_context(
            stored.model,
            form=ModelForm(instance=stored.model),
            editing=pk,
            route_form=form,
        ),
        status=400,
    )


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def route_prices(request: HttpRequest, pk: int) -> HttpResponse:
    """A route's upstream prices (what its provider charges us), with history; admins only.

    Each usage record keeps the upstream cost computed at request time, so a new price
    applies from its moment on and never changes a recorded margin.
    """
    stored = get_object_or_404(Route.objects.select_related("model", "provider"), pk=pk)
    data = request.POST.copy() if request.method == "POST" else None
    if data is not None:
        data["route"] = str(stored.pk)  # this page prices this route only
    form = ConsoleRoutePriceForm(data, initial={"route": stored.pk})
    if form.is_bound and form.is_valid():
        cleaned = form.cleaned_data
        try:
            price = do_set_route_price(
                route=stored,
                input_price=cleaned["input_per_mtok"],
                output_price=cleaned["output_per_mtok"],
                cached_input_price=cleaned["cached_input_per_mtok"],
                cache_write_price=cleaned["cache_write_per_mtok"],
                effective_from=cleaned["effective_from"],
            )
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request,
                _("New upstream price of this route saved, effective from %(when)s.")
                % {"when": timezone.localtime(price.effective_from).strftime("%Y-%m-%d %H:%M")},
            )
            return redirect("console:route_prices", pk=stored.pk)
    now = timezone.now()
    prices = list(stored.upstream_prices.order_by("-effective_from", "-id"))
    context = {
        "route": stored,
        "prices": prices,
        "current": next((price for price in prices if price.effective_from <= now), None),
        "now": now,
        "form": form,
        "currency": settings.SWITCHBOARD_CURRENCY,
        "zone": timezone.get_current_timezone_name(),
    }
    return render(
        request,
        "chatapp/console/route_prices.html",
        context,
        status=400 if form.is_bound else 200,
    )


def _route_row(request: HttpRequest, route: Route, form: RouteForm | None = None) -> HttpResponse:
    return render(
        request,
        "chatapp/console/model_detail.html#route-row",
        {
            "route": route,
            "route_health": routing.health(route.pk),
            "route_form": form,
            "editing": route.pk if form is not None else None,
        },
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _run_async(function: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
    """Run an async action from a sync view, in a context of its own.

    asgiref's async_to_sync copies the context variables the coroutine set back into
    the caller's thread: the pipeline's log context (a request id) would then stick to
    every later line this thread logs.
    """
    return contextvars.copy_context().run(async_to_sync(function), **kwargs)


# Mounted under /console/ in the "console" namespace (chatapp/urls.py): the catalog's pages.
console_urlpatterns: list[URLPattern | URLResolver] = [
    path("providers/", providers, name="providers"),
    path("providers/new/", provider_create, name="provider_create"),
    path("providers/<int:pk>/", provider, name="provider"),
    path("providers/<int:pk>/enabled/", provider_enabled, name="provider_enabled"),
    path("providers/<int:pk>/test/", provider_test, name="provider_test"),
    path("providers/<int:pk>/import/", provider_import, name="provider_import"),
    path("models/", models, name="models"),
    path("models/new/", model_create, name="model_create"),
    path("models/<int:pk>/", model, name="model"),
    path("models/<int:pk>/enabled/", model_enabled, name="model_enabled"),
    path("models/<int:pk>/routes/", model_route_add, name="model_route_add"),
    path("routes/<int:pk>/", route, name="route"),
    path("routes/<int:pk>/prices/", route_prices, name="route_prices"),
]
