"""The template's side of the zygote protocol (``forkd/zygote/PROTOCOL.md``).

The template connects to ``$SQUALL_ZYGOTE`` once warm and says ``ready``; then one loop waits,
with a selector, on the connection and on a pidfd per clone. ``clone <id>`` (with a listening
socket attached) forks a clone, whose child side never returns to this loop; a clone's pidfd
turning readable means it exited, and the template reaps it and reports ``exited``. At end of
stream forkd is gone: the template kills its clones, reaps them and exits.
"""

import os
import selectors
import signal
import socket
import sys
import traceback

from . import clone

MAX_MESSAGE = 4096

#: The exit status of a clone whose server failed.
SERVER_FAILED = 70


def run(socket_path, server):
    """Speaks the protocol on ``socket_path`` until forkd hangs up; returns the exit status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(socket_path)
    conn.send(b"ready")
    template = Template(conn, server)
    try:
        return template.loop()
    except KeyboardInterrupt:  # Ctrl-C in a terminal: the clones go too
        template.end()
        return 128 + signal.SIGINT


class Template:
    def __init__(self, conn, server):
        self.conn = conn
        self.server = server
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.selector.register(conn, selectors.EVENT_READ)
        self.clones = {}  # pid -> (clone id, pidfd)

    def loop(self):
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.conn:
                    message, fds, _, _ = socket.recv_fds(self.conn, MAX_MESSAGE, 1)
                    if not message:
                        return self.end()
                    self.handle(message.decode("ascii", "replace"), fds)
                else:
                    self.reap(key.data)

    def handle(self, message, fds):
        words = message.split(" ")
        if len(words) != 2 or words[0] != "clone":
            for fd in fds:
                os.close(fd)
            print(f"squall-zygote: ignoring an unknown message from forkd: {message!r}", file=sys.stderr)
            return
        clone_id = words[1]
        if len(fds) != 1:
            self.send(f"failed {clone_id} no listening socket was attached")
            return
        self.fork(clone_id, fds[0])

    def fork(self, clone_id, listener_fd):
        try:
            pid = os.fork()
        except OSError as error:
            os.close(listener_fd)
            self.send(f"failed {clone_id} fork: {error.strerror or error}")
            return
        if pid == 0:
            os._exit(self.be_clone(clone_id, listener_fd))
        # The parent's copy goes at once, so that later clones do not inherit it.
        os.close(listener_fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as error:  # cannot watch it: do not keep a clone nobody can reap
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.send(f"failed {clone_id} pidfd_open: {error.strerror or error}")
            return
        self.clones[pid] = (clone_id, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        self.send(f"forked {clone_id} {pid}")

    def be_clone(self, clone_id, listener_fd):
        """The child's side: never returns to the loop; returns the clone's exit status."""
        try:
            # What belongs to the template: its connection, its selector, its watches.
            self.selector.close()
            self.conn.close()
            for _, pidfd in self.clones.values():
                os.close(pidfd)
            self.clones.clear()
            clone.become(clone_id, self.pid)
            sock = socket.socket(fileno=listener_fd)
            self.server.serve_socket(sock)
            return 0
        except KeyboardInterrupt:  # Ctrl-C in a terminal reaches every clone: end quietly
            return 128 + signal.SIGINT
        except SystemExit as exit:  # the server's own way to stop: keep its status
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            if status != 0:
                print(f"squall-zygote: clone {clone_id}: the server exited with status {status}", file=sys.stderr)
            return status
        except BaseException:
            print(
                f"squall-zygote: clone {clone_id} failed:\n{traceback.format_exc().rstrip()}",
                file=sys.stderr,
            )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return SERVER_FAILED

    def reap(self, pid):
        clone_id, pidfd = self.clones.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        how = f"code {code}" if code >= 0 else f"signal {-code}"
        self.send(f"exited {clone_id} {how}")

    def send(self, message):
        try:
            self.conn.send(message.encode("ascii"))
        except OSError:
            pass  # forkd is gone: the end of stream ends the loop

    def end(self):
        """forkd hung up: no clone may outlive the template."""
        for pid in self.clones:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, (_, pidfd) in self.clones.items():
            os.waitpid(pid, 0)
            os.close(pidfd)
        self.clones.clear()
        return 0
