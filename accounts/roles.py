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
