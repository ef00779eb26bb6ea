"""Warm forks of unmodified WSGI and ASGI apps for Squall's fork driver.

``python3 -m squall_zygote wsgi MODULE:APP`` (or ``asgi``) imports the app once in a template
process, speaks forkd's zygote protocol (``forkd/zygote/PROTOCOL.md``) when ``SQUALL_ZYGOTE`` is
set, and serves each forked clone with a real server: waitress for WSGI, uvicorn for ASGI.
Without ``SQUALL_ZYGOTE`` it serves on ``$HOST:$PORT`` like any app under the spawn driver.

The modules: ``cli`` (the command line), ``app`` (loading and checking the app, the clone-id
wrappers), ``server`` (waitress and uvicorn on a given socket or port), ``zygote`` (the
template's side of the protocol) and ``clone`` (a clone's duties right after the fork).
"""

__version__ = "0.1.0"
