"""Apps that are wrong in the ways `squall_zygote` must refuse or report clearly."""

import contextlib
import ctypes
import os

from starlette.applications import Starlette


def failing_warmup():
    """A warm-up hook that fails, as when a model file is missing."""
    raise OSError("the model file is missing")


#: Not an app at all.
greeting = "hello"


def crash_on_request(environ, start_response):
    """A WSGI app whose clone crashes (a segfault, as in a broken extension) on `/crash`."""
    if environ["PATH_INFO"] == "/crash":
        ctypes.string_at(0)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"pid {os.getpid()}\n".encode()]


@contextlib.asynccontextmanager
async def _startup_fails(app):
    raise RuntimeError("the database is unreachable")
    yield


#: An ASGI app whose startup (in each clone) fails.
fails_at_startup = Starlette(lifespan=_startup_fails)
