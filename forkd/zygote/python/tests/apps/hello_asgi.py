"""A small Starlette app: it says which clone served it, a random number, and whether the
warm-up ran in the template."""

import os
import random

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

CACHE = {}


def warm():
    CACHE.update((i, i * i) for i in range(100_000))


async def hello(request):
    return JSONResponse(
        {
            "clone": os.environ.get("SQUALL_CLONE_ID"),
            "random": random.random(),
            "cache": len(CACHE),
            "pid": os.getpid(),
        }
    )


app = Starlette(routes=[Route("/", hello)])
