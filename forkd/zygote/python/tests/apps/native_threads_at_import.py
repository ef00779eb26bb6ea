"""A WSGI app whose import starts a thread Python's `threading` does not know (as a C
library's pool would): it cannot be forked safely either."""

import _thread
import time

_thread.start_new_thread(time.sleep, (3600,))


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok\n"]
