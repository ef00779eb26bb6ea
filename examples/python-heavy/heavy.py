"""A Python web app with a heavy warm-up, to show what forking warm workers saves.

Importing this module builds what a real app would load before it can serve: here a
256 MiB table of pseudo-random bytes (standing in for a model's weights or a large lookup
table) and an index of its blocks' digests, about a second of work on one core. Each request reads from the
table. Served by `python3 -m squall_zygote wsgi heavy:app`: the template pays the warm-up
once and every clone shares the table's pages copy-on-write; under `--driver spawn` every
worker pays it again.

    GET /healthz            -> ok
    GET /lookup?key=N       -> block N's first byte and digest (N modulo the block count)
    GET /                   -> the table's size, who built it, who serves, the clone id
"""

import hashlib
import os
import random
import time
from urllib.parse import parse_qs

TABLE_MIB = int(os.environ.get("HEAVY_TABLE_MIB", "256"))
BLOCK = 4096

_started = time.monotonic()
# A deterministic table, the same in every process that builds it.
_rng = random.Random(20261202)
TABLE = b"".join(_rng.randbytes(1 << 20) for _ in range(TABLE_MIB))
BLOCKS = len(TABLE) // BLOCK
# An index over the table, as a real app would precompute: every block's digest.
INDEX = [hashlib.sha256(TABLE[i * BLOCK : (i + 1) * BLOCK]).digest() for i in range(BLOCKS)]
WARMUP_SECONDS = time.monotonic() - _started
# The process that built them: the template, when forked by squall_zygote.
BUILT_BY = os.getpid()


def _reply(start_response, status, body):
    data = body.encode()
    start_response(
        status,
        [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))],
    )
    return [data]


def app(environ, start_response):
    """The WSGI app."""
    path = environ.get("PATH_INFO", "/")
    if path == "/healthz":
        return _reply(start_response, "200 OK", "ok\n")
    if path == "/lookup":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            key = int(query.get("key", ["0"])[0]) % BLOCKS
        except ValueError:
            return _reply(start_response, "400 Bad Request", "key: expected a number\n")
        first = TABLE[key * BLOCK]
        return _reply(start_response, "200 OK", f"{key} {first} {INDEX[key].hex()}\n")
    if path == "/":
        clone = os.environ.get("SQUALL_CLONE_ID", "")
        return _reply(
            start_response,
            "200 OK",
            f"table {TABLE_MIB} MiB, built in {WARMUP_SECONDS:.2f} s by pid {BUILT_BY}, "
            f"served by pid {os.getpid()}, clone {clone}\n",
        )
    return _reply(start_response, "404 Not Found", "not found\n")
