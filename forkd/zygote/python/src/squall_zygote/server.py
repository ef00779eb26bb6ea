"""The production servers each clone runs: waitress for WSGI, uvicorn for ASGI.

A :class:`Server` is made in the template, before the fork, so that the server's modules (and
uvicorn's loaded configuration) are part of the warm memory every clone shares; it starts
serving only in the clone, on the listening socket forkd handed over. No HTTP is parsed here.
"""

import logging
import os
import socket
import sys
import time

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
                import waitress.server
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

    def prepare(self):
        """In a spare clone, before it has a socket: makes what serving needs, so that a
        clone given its socket serves at once. Returns what :meth:`serve_socket` takes as
        ``prepared``: for WSGI a :class:`SpareWaitress`, or None when it cannot be made (the
        clone then makes its server when it gets its socket, as without a spare)."""
        if self.kind != "wsgi":
            return None
        try:
            return SpareWaitress(self._waitress, self.app, self.threads, self.prime_path)
        except (AttributeError, OSError) as error:  # a waitress unlike 2.x-3.x, or no loopback
            print(
                f"squall-zygote: a spare clone cannot prepare waitress ahead: {error!r}",
                file=sys.stderr,
            )
            return None

    def serve_socket(self, sock, prepared=None):
        """Serves on ``sock``, a listening TCP socket, until the process is told to stop;
        ``prepared`` is what :meth:`prepare` made in this process, if it ran."""
        if self.kind == "wsgi":
            if prepared is not None and prepared.adopt(sock):
                prepared.run()
                return
            self._waitress.serve(self.app, sockets=[sock], threads=self.threads)
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


class SpareWaitress:
    """A waitress server made in a spare clone before the clone has its socket: its request
    threads run, and it listens on a placeholder loopback socket, through which it serves
    ``GET prime_path`` to itself over a real connection, so that the pages the first request
    writes, in waitress and in the app (every object it touches has its reference count
    written), are copied now and not while a client waits. :meth:`adopt` then puts the
    clone's listening socket in the placeholder's place (the same descriptor number, so the
    server's poll set does not change).

    It uses two attributes waitress has had since 1.x, ``_map`` and ``asyncore``; without
    them, :meth:`Server.prepare` falls back to making the server later."""

    #: How long priming may take before the spare serves without it.
    PRIME_SECONDS = 10.0

    def __init__(self, waitress, app, threads, prime_path):
        self.placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.placeholder.bind(("127.0.0.1", 0))
            self.placeholder.listen()
            self.server = waitress.server.create_server(
                app, sockets=[self.placeholder], threads=threads
            )
        except BaseException:
            self.placeholder.close()
            raise
        self.loop_once = lambda timeout: self.server.asyncore.loop(
            timeout=timeout, map=self.server._map, count=1
        )
        if prime_path:
            self.prime(prime_path)

    def prime(self, path):
        """Serves ``GET path`` through the placeholder socket and drops the answer; a
        failure, or an answer other than 2xx or 3xx, is said on stderr and does not stop the
        clone."""
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        deadline = time.monotonic() + self.PRIME_SECONDS
        answer = bytearray()
        # The request threads may not all wait yet, which waitress would warn of as a queue.
        queue_logger = logging.getLogger("waitress.queue")
        was_disabled, queue_logger.disabled = queue_logger.disabled, True
        try:
            with socket.create_connection(self.placeholder.getsockname(), timeout=1.0) as client:
                client.sendall(request.encode("ascii"))
                client.setblocking(False)
                while time.monotonic() < deadline:
                    self.loop_once(0.005)
                    try:
                        data = client.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        break
                    answer += data[: max(0, 64 - len(answer))]
                else:
                    took = f"took over {self.PRIME_SECONDS:.0f} s"
                    print(f"squall-zygote: priming with GET {path} {took}", file=sys.stderr)
            # Until the server has closed its side (its map: itself and its trigger).
            while len(self.server._map) > 2 and time.monotonic() < deadline:
                self.loop_once(0.005)
        except OSError as error:
            print(f"squall-zygote: priming with GET {path} failed: {error}", file=sys.stderr)
            return
        finally:
            queue_logger.disabled = was_disabled
        status = bytes(answer).split(b"\r\n", 1)[0].decode("latin-1")
        code = status.split(" ")[1:2]
        if not code or code[0][:1] not in ("2", "3"):
            print(
                f"squall-zygote: priming with GET {path} was answered {status!r}", file=sys.stderr
            )

    def adopt(self, sock):
        """Serves on ``sock`` (a listening TCP socket) from now on, in the placeholder's
        place; False if it cannot (another address family), and then the caller serves it."""
        if sock.family != self.placeholder.family:
            self.server.close()
            return False
        os.dup2(sock.fileno(), self.placeholder.fileno(), inheritable=False)
        sock.close()
        self.placeholder.setblocking(False)  # the new open file's flag, as waitress set the old
        self.server.effective_host, self.server.effective_port = self.server.getsockname()
        return True

    def run(self):
        """Serves until the process is told to stop, as ``waitress.serve`` does."""
        logging.basicConfig()
        self.server.print_listen("Serving on http://{}:{}")
        self.server.run()
