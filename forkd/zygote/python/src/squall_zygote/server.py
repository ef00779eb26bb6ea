"""The production servers each clone runs: waitress for WSGI, uvicorn for ASGI.

A :class:`Server` is made in the template, before the fork, so that the server's modules (and
uvicorn's loaded configuration) are part of the warm memory every clone shares; it starts
serving only in the clone, on the listening socket forkd handed over. No HTTP is parsed here.
"""

import logging
import sys

from .app import LoadError, asgi_with_clone_id, wsgi_with_clone_id


#: The exit status of a server whose app failed to start (uvicorn's own).
STARTUP_FAILED = 3


class Server:
    """One app ready to be served by its kind's server, on a socket or on a port."""

    def __init__(self, kind, app, threads, prime=None):
        self.kind = kind
        self.prime_path = prime
        if kind == "wsgi":
            try:
                import waitress
                import waitress.server  # noqa: F401  (warm: imported once, shared by clones)
            except ImportError as error:
                raise LoadError(_missing("waitress", "wsgi", error)) from None
            self._waitress = waitress
            self.app = wsgi_with_clone_id(app)
            self.threads = threads
        else:
            try:
                import uvicorn
            except ImportError as error:
                raise LoadError(_missing("uvicorn", "asgi", error)) from None
            self._uvicorn = uvicorn
            self.app = asgi_with_clone_id(app)
            # Loaded now, in the template: the protocol and logging modules it imports are
            # imported once. Loading starts no thread and no event loop.
            self._config = uvicorn.Config(self.app, interface="asgi3", lifespan="auto")
            self._config.load()

    def prime(self):
        """In a spare clone: serves ``GET prime_path`` to itself through the app, in-process,
        and drops the answer, so that the pages the first request writes (every object it
        touches has its reference count written) are copied now, not while a client waits.
        A failure is said on stderr and does not stop the clone."""
        if self.kind != "wsgi" or not self.prime_path:
            return
        import io

        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": self.prime_path,
            "QUERY_STRING": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "localhost",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        try:
            body = self.app(environ, lambda status, headers, exc_info=None: lambda data: None)
            try:
                for _ in body:
                    pass
            finally:
                if hasattr(body, "close"):
                    body.close()
        except Exception as error:
            print(f"squall-zygote: priming with GET {self.prime_path} failed: {error!r}", file=sys.stderr)

    def prepare(self):
        """In a spare clone, before it has a socket: starts what serving needs that may only
        start after the fork (waitress's request threads), so that a clone given its socket
        serves at once. Returns what :meth:`serve_socket` takes as ``prepared``."""
        if self.kind != "wsgi":
            return None
        from waitress.task import ThreadedTaskDispatcher

        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(self.threads)
        return dispatcher

    def serve_socket(self, sock, prepared=None):
        """Serves on ``sock``, a listening TCP socket, until the process is told to stop;
        ``prepared`` is what :meth:`prepare` made in this process, if it ran."""
        if self.kind == "wsgi":
            if prepared is None:
                self._waitress.serve(self.app, sockets=[sock], threads=self.threads)
                return
            logging.basicConfig()  # as `waitress.serve` does
            # `_dispatcher` takes request threads already running (waitress 2.1 to 3.0 have
            # it); a waitress without it serves as `waitress.serve` does, threads started now.
            try:
                server = self._waitress.server.create_server(
                    self.app, sockets=[sock], threads=self.threads, _dispatcher=prepared
                )
            except TypeError:
                server = self._waitress.server.create_server(
                    self.app, sockets=[sock], threads=self.threads
                )
            server.print_listen("Serving on http://{}:{}")
            server.run()
            return
        # `Server.run(sockets=...)` rather than `Config(fd=...)`: uvicorn wraps an `fd` as an
        # AF_UNIX socket, which loses the clients' addresses.
        self._run_uvicorn(self._config, sockets=[sock])

    def serve_port(self, host, port):
        """Serves on ``host:port``, binding it itself (without a zygote: the spawn driver)."""
        if self.kind == "wsgi":
            self._waitress.serve(self.app, host=host, port=port, threads=self.threads)
            return
        config = self._uvicorn.Config(
            self.app, host=host, port=port, interface="asgi3", lifespan="auto"
        )
        self._run_uvicorn(config, sockets=None)

    def _run_uvicorn(self, config, sockets):
        server = self._uvicorn.Server(config)
        server.run(sockets=sockets)  # uvicorn ≥ 0.29 exits with STARTUP_FAILED itself
        if not server.started:
            sys.exit(STARTUP_FAILED)


def _missing(package, kind, error):
    return (
        f"the {kind} command serves with {package}, which cannot be imported ({error}): "
        f"pip install 'squall-zygote[{kind}]'"
    )
