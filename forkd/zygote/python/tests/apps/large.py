"""A WSGI app whose import builds a 64 MiB table, the same in every process that builds it;
each request answers the table's digest, computed then, so that a clone shows it reads the
template's table intact."""

import hashlib
import random

TABLE = random.Random(7).randbytes(64 << 20)


def app(environ, start_response):
    body = hashlib.sha256(TABLE).hexdigest().encode() + b"\n"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
