"""The command line: ``python3 -m squall_zygote wsgi|asgi MODULE:APP [--warmup MODULE:FUNC]``.

It loads and checks the app, runs the warm-up hook, prepares the server, and then either speaks
the zygote protocol (``$SQUALL_ZYGOTE`` set: forkd's fork driver) or serves on ``$HOST:$PORT``
itself (the spawn driver, or a plain run). Everything that can be wrong with the app is found
here, before ``ready``, and said on stderr with a non-zero exit status.
"""

import argparse
import os
import sys
import threading

from . import memory, zygote
from .app import Clone, LoadError, check, load, traceback
from .server import Server

#: Exit statuses.
BAD_APP = 2
THREADS_BEFORE_FORK = 3


def parser():
    parser = argparse.ArgumentParser(
        prog="python3 -m squall_zygote",
        description="Serve a WSGI or ASGI app as a warm template for Squall's fork driver "
        "(with SQUALL_ZYGOTE set), or on $HOST:$PORT.",
    )
    commands = parser.add_subparsers(dest="kind", required=True, metavar="{wsgi,asgi}")
    for kind, server in (("wsgi", "waitress"), ("asgi", "uvicorn")):
        command = commands.add_parser(kind, help=f"serve a {kind.upper()} app with {server}")
        command.add_argument("app", metavar="MODULE:APP", help="the app: an object in a module")
        command.add_argument(
            "--warmup",
            metavar="MODULE:FUNC",
            help="a function called once in the template, after the import (fill a cache, "
            "load a model); it must not leave threads running",
        )
        command.add_argument(
            "--allow-native-threads",
            action="store_true",
            help="fork even though threads Python does not know run in the template (a C "
            "library's pool that restarts itself in each process)",
        )
        command.add_argument(
            "--spares",
            type=_count,
            default=2,
            help="clones forked ahead of their requests, ready to serve (2); 0 forks each "
            "clone when it is asked for",
        )
        command.add_argument(
            "--no-huge-pages",
            action="store_true",
            help="leave the template's large memory in 4 KiB pages (by default it is moved "
            "into huge pages before the first fork, so that forking stays fast however much "
            "it holds)",
        )
        if kind == "wsgi":
            command.add_argument(
                "--prime",
                metavar="PATH",
                type=_path,
                help="a side-effect-free GET path each clone serves to itself before it is "
                "asked for, in-process (say /healthz): the first request's copy-on-write costs "
                "are paid ahead",
            )
            command.add_argument(
                "--threads", type=_positive, default=4, help="request threads per clone (4)"
            )
    return parser


def _path(text):
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected a path starting with /, got {text!r}")
    return text


def _count(text):
    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 64, got {text!r}")
    return int(text)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None):
    args = parser().parse_args(argv)
    socket_path = os.environ.get("SQUALL_ZYGOTE")
    try:
        app = load(args.app)
        check(args.kind, app, args.app)
        if args.warmup:
            warmup = load(args.warmup, what="FUNC")
            if not callable(warmup):
                raise LoadError(
                    f"the warm-up {args.warmup!r} is a {type(warmup).__name__}, not a function"
                )
            try:
                warmup()
            except BaseException:  # the app's own code: anything it raises
                raise LoadError(f"the warm-up {args.warmup!r} failed:\n{traceback()}") from None
        server = Server(
            args.kind, app, getattr(args, "threads", None), getattr(args, "prime", None)
        )
    except LoadError as error:
        _say(str(error))
        return BAD_APP

    if not socket_path:
        return _serve_port(server)
    threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        names = ", ".join(repr(t.name) for t in threads)
        _say(
            f"refusing to fork {args.app!r}: it started {len(threads)} thread(s) before the fork: "
            f"{names}. Only the forking thread survives a fork, so clones would lose them and "
            f"could hang on locks they held. Start threads after the fork (lazily, on the first "
            f"request, or in an ASGI lifespan startup)."
        )
        return THREADS_BEFORE_FORK
    native = _native_threads()
    if native and not args.allow_native_threads:
        _say(
            f"refusing to fork {args.app!r}: {len(native)} thread(s) that Python's threading "
            f"does not know run besides the main thread (started by C code or _thread): "
            f"{', '.join(native)}. They would not exist in the clones, which could hang on locks "
            f"they held. If they are safe to lose at a fork (a pool that restarts itself, such "
            f"as OpenBLAS's), pass --allow-native-threads."
        )
        return THREADS_BEFORE_FORK
    if not args.no_huge_pages:
        collapsed = memory.collapse()
        if collapsed.regions:
            _say(str(collapsed))
    return zygote.run(socket_path, server, args.spares)


def _serve_port(server):
    host = os.environ.get("HOST") or "127.0.0.1"
    port = os.environ.get("PORT") or "8000"
    if not port.isdigit() or not 0 < int(port) < 65536:
        _say(f"PORT={port!r} is not a port number (1 to 65535)")
        return BAD_APP
    clone_id = os.environ.get("SQUALL_CLONE_ID")
    if clone_id:
        Clone.become(clone_id)
    server.serve_port(host, int(port))
    return 0


def _native_threads():
    """The threads of this process besides the main one that `threading` does not know (a C
    library's pool, `_thread`), as "TID (NAME)"."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    found = []
    for task in tasks:
        if task == str(os.getpid()):
            continue
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                found.append(f"{task} ({comm.read().strip()})")
        except OSError:
            found.append(task)
    return found


def _say(message):
    print(f"squall-zygote: {message}", file=sys.stderr, flush=True)
