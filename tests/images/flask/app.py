"""Squall's test app for container images: a small Flask app, served by waitress.

It answers `/healthz`, `/` (a greeting from the image's environment, and this worker's clone
id), `/whoami` (the user, group and working directory it runs as, and its arguments) and `/write` (it writes a
file under /tmp and /var, which the guest's overlay keeps in memory), and listens on `PORT`
(8000 when unset, the port the image exposes).
"""

import os
import sys

from flask import Flask
from waitress import serve

app = Flask(__name__)

# Work done once at start, before the template is snapshotted: clones inherit it warm.
PRIMES = [n for n in range(2, 50_000) if all(n % d for d in range(2, int(n**0.5) + 1))]


def clone_id():
    path = os.environ.get("SQUALL_CLONE_ID_FILE")
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read().decode().strip()
    except OSError:
        return ""


@app.get("/healthz")
def healthz():
    return "ok\n"


@app.get("/")
def index():
    greeting = os.environ.get("GREETING", "")
    return f"{greeting} from flask, clone {clone_id()}, {len(PRIMES)} primes\n"


@app.get("/whoami")
def whoami():
    args = " ".join(sys.argv[1:])
    return f"uid={os.getuid()} gid={os.getgid()} cwd={os.getcwd()} args={args}\n"


@app.get("/write")
def write():
    for directory in ("/tmp", "/var/tmp"):
        with open(os.path.join(directory, "squall-test"), "w") as f:
            f.write(clone_id())
    return "written\n"


if __name__ == "__main__":
    serve(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8000")), threads=4)
