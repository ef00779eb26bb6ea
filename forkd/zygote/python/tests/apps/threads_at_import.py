"""A WSGI app that starts a thread when imported: it cannot be forked safely."""

import threading
import time


def _refresh():
    while True:
        time.sleep(60)


threading.Thread(target=_refresh, name="cache-refresher", daemon=True).start()


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok\n"]
