"""Role checks shared by views and consumers.

Admins pass every check; finance and member pass only their own.  Each check also
re-reads ``is_active`` so a user disabled mid-session is refused on the next request.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction
from django.contrib.auth.models import AnonymousUser
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseBase

from accounts.models import User

ViewFunc = TypeVar("ViewFunc", bound=Callable[..., Any])


def check_role(user: User | AnonymousUser | None, *roles: str) -> bool:
    """True when ``user`` is a signed-in, active user holding one of ``roles``."""
    return isinstance(user, User) and user.has_role(*roles)


def role_required(*roles: str) -> Callable[[ViewFunc], ViewFunc]:
    """View decorator: anonymous users go to the login page, others need a role (else 403)."""

    def decorator(view: ViewFunc) -> ViewFunc:
        def refuse(request: HttpRequest, user: Any) -> HttpResponseBase | None:
            if not user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not check_role(user, *roles):
                raise PermissionDenied
            return None

        if iscoroutinefunction(view):

            @wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                user = await request.auser()
                return refuse(request, user) or await view(request, *args, **kwargs)

            return cast(ViewFunc, async_wrapper)

        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return refuse(request, request.user) or view(request, *args, **kwargs)

        return cast(ViewFunc, wrapper)

    return decorator


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def console_page(
    *, read: tuple[str, ...], write: tuple[str, ...] = ()
) -> Callable[[ViewFunc], ViewFunc]:
    """Decorator for a console view: who may see it (``read``) and who may change (``write``).

    Anonymous users go to the login page.  A signed-in user whose role is not in
    ``read`` gets 403; one whose role may read but not write gets 403 on every
    method that is not GET/HEAD/OPTIONS (finance reads the console, never changes
    it).  Admins pass both.  Each request also sets who is acting for the audit log
    (``accounts.audit``), so the actions the view calls record the right actor.
    """
    from accounts import audit

    def decorator(view: ViewFunc) -> ViewFunc:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            user = request.user
            if not user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not check_role(user, *read):
                raise PermissionDenied
            if request.method not in SAFE_METHODS and not check_role(user, *write):
                raise PermissionDenied
            with audit.acting_for(request):
                return view(request, *args, **kwargs)

        wrapper.console_read = read  # type: ignore[attr-defined]
        wrapper.console_write = write  # type: ignore[attr-defined]
        return cast(ViewFunc, wrapper)

    return decorator
