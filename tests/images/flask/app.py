"""A small Flask app for Squall's microVM root-filesystem tests: `/` greets, `/healthz` says ok.

Served by waitress on $PORT (8000 when unset)."""

import os

from flask import Flask
from waitress import serve

app = Flask(__name__)


@app.get("/")
def index():
    return f"{os.environ.get('GREETING', 'hello')} from flask\n"


@app.get("/healthz")
def healthz():
    return "ok\n"


if __name__ == "__main__":
    serve(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8000")))
