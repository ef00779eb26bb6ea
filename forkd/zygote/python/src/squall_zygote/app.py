"""Loading the app a command names, checking that it is what the command serves, and the
wrappers that make every response say which clone served it.

Every failure here is a :class:`LoadError` whose message is what the user reads on stderr:
it names the ``MODULE:APP`` given, and says what was found and what was expected.
"""

import importlib
import inspect
import os
import sys
import traceback as _traceback

#: The response header naming the clone that served a response.
CLONE_HEADER = "x-squall-clone-id"


class LoadError(Exception):
    """The app (or the warm-up hook) could not be loaded; the message says why."""


def load(spec, what="APP"):
    """Imports ``MODULE:NAME`` (``NAME`` may be dotted) and returns the object it names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise LoadError(f"{spec!r} is not MODULE:{what} (a module, a colon, an object in it)")
    # `python3 -m` puts the working directory first on sys.path; a console script does not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (
            error.name == module_name or module_name.startswith(error.name + ".")
        ):
            raise LoadError(
                f"cannot import {module_name!r} (from {spec!r}): no module named {error.name!r} "
                f"on sys.path {sys.path}"
            ) from None
        raise LoadError(
            f"importing {module_name!r} (from {spec!r}) failed:\n{traceback()}"
        ) from None
    except BaseException:  # the app's own code: anything it raises, SystemExit included
        raise LoadError(
            f"importing {module_name!r} (from {spec!r}) failed:\n{traceback()}"
        ) from None
    found = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise LoadError(
                f"module {module_name!r} has no {attribute!r} (from {spec!r}): "
                f"expected MODULE:{what} naming an object defined in the module"
            ) from None
    return found


def traceback():
    """The exception being handled, with its stack, as Python prints it."""
    return _traceback.format_exc().rstrip()


def _takes(app, count):
    """Whether ``app`` can be called with ``count`` positional arguments (True when its
    signature cannot be read, as for some callables written in C)."""
    try:
        inspect.signature(app).bind(*([None] * count))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _is_async(app):
    call = app if inspect.isroutine(app) else getattr(type(app), "__call__", None)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)


def check(kind, app, spec):
    """Raises :class:`LoadError` unless ``app`` is a ``kind`` ("wsgi" or "asgi") application."""
    if not callable(app):
        raise LoadError(
            f"{spec!r} is a {type(app).__name__}, not a {kind.upper()} application "
            f"(expected {_SHAPE[kind]})"
        )
    if kind == "wsgi":
        if _is_async(app) or (_takes(app, 3) and not _takes(app, 2)):
            raise LoadError(
                f"{spec!r} looks like an ASGI application (async, or called with scope, "
                f"receive, send), not a WSGI one: serve it with `asgi`"
            )
        if not _takes(app, 2):
            raise LoadError(f"{spec!r} is not a WSGI application (expected {_SHAPE[kind]})")
    else:
        if _takes(app, 2) and not _takes(app, 3) and not _is_async(app):
            raise LoadError(
                f"{spec!r} looks like a WSGI application (called with environ, "
                f"start_response), not an ASGI one: serve it with `wsgi`"
            )
        if not _takes(app, 3):
            raise LoadError(f"{spec!r} is not an ASGI 3 application (expected {_SHAPE[kind]})")


_SHAPE = {
    "wsgi": "a callable taking environ and start_response",
    "asgi": "an async callable taking scope, receive and send",
}


class Clone:
    """Which clone this process is: set once in a clone (or from ``SQUALL_CLONE_ID`` when
    spawned), read by the wrappers on every response."""

    id = None

    @classmethod
    def become(cls, clone_id):
        cls.id = clone_id
        os.environ["SQUALL_CLONE_ID"] = clone_id


def wsgi_with_clone_id(app):
    """``app``, adding the clone-id header to every response once this process is a clone."""

    def with_clone_id(environ, start_response):
        if Clone.id is None:
            return app(environ, start_response)

        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, (CLONE_HEADER, Clone.id)], exc_info)

        return app(environ, start)

    return with_clone_id


def asgi_with_clone_id(app):
    """``app``, adding the clone-id header to every HTTP response once this process is a clone."""

    async def with_clone_id(scope, receive, send):
        if Clone.id is None or scope["type"] != "http":
            return await app(scope, receive, send)
        header = (CLONE_HEADER.encode(), Clone.id.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        return await app(scope, receive, send_with_id)

    return with_clone_id
