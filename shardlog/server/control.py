"""The control socket: operators' tools talk to a running server here.

Theory of operation
-------------------
A Unix stream socket (default ``/run/shardlog/control.sock``), served from the arbiter's
own event loop (arbiter.py, eventloop.py).  It is root's: its directory is made 0700 and
the socket 0600, and every connection's peer credentials (SO_PEERCRED) are checked as
well, since a process with CAP_DAC_OVERRIDE but another uid could still reach it; such a
peer gets one error line and is closed.

The protocol is line-delimited JSON.  A client sends one object per line,
``{"cmd": "status"}`` or ``{"cmd": "trace", ...}``; the server answers with objects, one
per line: one answer for ``status``, a stream of events for ``trace``, ``{"error": ...}``
for anything it cannot do.  Commands are the server's (a table of callables: commands.py); this
module only moves lines.

Never blocking the front is the point of the design: every socket is non-blocking, a
client's output waits in its own buffer (flushed when epoll says the socket takes more),
and a buffer that grows past :data:`OUTPUT_LIMIT` is the client's problem, not the
front's: a one-shot answer is still queued whole (it is bounded by the number of logs),
while streamed lines (:meth:`Connection.send_line`) are sent once per wakeup of the
loop (:meth:`ControlServer.flush_streams`) and, past the limit, dropped and counted,
and the count is sent to the client once its buffer drains.  A client that sends more
than :data:`LINE_LIMIT` bytes without a newline, or whose connection fails, is closed.
At most :data:`MAX_CLIENTS` are served at once.

The client side (:func:`connect`, :func:`ask`, :func:`stream`) turns what can go wrong
into one-line :class:`ControlError` messages: no server, permission denied, a server
that closed the connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardlog.server.eventloop import EventLoop

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/run/shardlog/control.sock")
OUTPUT_LIMIT = 1 << 20  # bytes queued for one client before streamed lines are dropped
LINE_LIMIT = 1 << 16  # a request line longer than this is not a request
MAX_CLIENTS = 32
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the NUL included
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Command = Callable[["Connection", dict], None]


class ControlSetupError(Exception):
    """The control socket cannot be made; the message says why, in one line."""


class Connection:
    """One client of the control socket, as the front sees it."""

    def __init__(self, server: ControlServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbox = bytearray()
        self.out = bytearray()
        self.dropped = 0  # streamed lines dropped since the client last caught up
        self.closed = False
        self.close_when_sent = False
        self.eof = False  # the client shut its side: nothing more will be read
        self.on_close: list[Callable[[], None]] = []
        self._events = select.EPOLLIN
        self._shut = False

    def send(self, message: dict) -> None:
        """Queue one answer, whatever the client's backlog (it is bounded by the server's
        state, not by a stream)."""
        self._queue(json.dumps(message).encode() + b"\n")

    def send_line(self, line: bytes, *, droppable: bool = True) -> bool:
        """Queue one streamed line (JSON, with its newline), or drop and count it when the
        client has not taken what it was sent: whether it was queued.  ``droppable=False``:
        a rare line that says what the stream itself lost, queued whatever the backlog."""
        if self.close_when_sent:
            return False
        if droppable and len(self.out) >= OUTPUT_LIMIT:
            self.dropped += 1
            return False
        if not self.closed:
            # Sent by flush_streams at the end of the loop's wakeup: one send per batch of
            # lines, not a system call per traced request.
            self.out += line
            self.server.unsent.add(self)
        return True

    def finish(self) -> None:
        """Close once everything queued is sent and the client has seen it: the write
        side is shut first and the socket closed at the client's EOF, since closing with
        the client's request still unread would reset the connection, and the client
        could lose the answer."""
        self.close_when_sent = True
        self.flush()

    def _queue(self, data: bytes) -> None:
        if self.closed or self._shut:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        if self.closed:
            return
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.out[:sent]
        if not self.out and self.dropped:
            # The client caught up: tell it how much it missed, now, not at the next line.
            self.out += json.dumps({"dropped": self.dropped}).encode() + b"\n"
            self.dropped = 0
            self.flush()
            return
        if not self.out and self.close_when_sent:
            if self.eof:
                self.close()
                return
            if not self._shut:
                self._shut = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
        self._set_events()

    def _set_events(self) -> None:
        events = (0 if self.eof else select.EPOLLIN) | (select.EPOLLOUT if self.out else 0)
        if events != self._events:
            self._events = events
            with contextlib.suppress(OSError):
                self.server.loop.modify(self.fd, events)

    def on_ready(self) -> None:
        """epoll says the socket can be read or written (or was hung up)."""
        self.flush()
        if self.closed or self.eof:
            return
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.close()  # reset: nothing can reach it any more
                return
            if not data:
                self._on_eof()
                return
            if self.close_when_sent:
                continue  # refused or answered: whatever else it sends is not read
            self.inbox += data
            if b"\n" not in self.inbox and len(self.inbox) > LINE_LIMIT:
                self.send({"error": f"request line longer than {LINE_LIMIT} bytes"})
                self.finish()
                return
            while b"\n" in self.inbox and not self.close_when_sent:
                line, _, rest = bytes(self.inbox).partition(b"\n")
                self.inbox[:] = rest
                self.server.dispatch(self, line)

    def _on_eof(self) -> None:
        """The client sent all it will: what is queued still goes (a tracer that shuts
        its side gets the lines it was sent), nothing more is added."""
        self.eof = True
        if self.out:
            self.finish()
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self)
        # Closed before the callbacks run: one may fork (a failed take-over respawns the
        # workers), and a child must not inherit a connection its parent has let go.
        self.sock.close()
        for callback in self.on_close:
            callback()


class ControlServer:
    """The listening socket and its clients, in the caller's event loop (eventloop.py).

    ``commands`` maps a request's ``cmd`` to the callable that answers it.
    """

    def __init__(self, path: Path, loop: EventLoop, commands: dict[str, Command]):
        self.path = path
        self.loop = loop
        self.commands = commands
        self.clients: dict[int, Connection] = {}
        self.unsent: set[Connection] = set()  # streamed lines queued since the last flush
        self.sock: socket.socket | None = None

    def open(self) -> None:
        """Make the directory (0700) and the socket (0600); ControlSetupError if either
        is unsafe or in use."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(directory)
        except OSError as exc:
            raise ControlSetupError(f"control socket directory {directory}: "
                                    f"{exc.strerror}") from exc
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ControlSetupError(
                f"control socket directory {directory} is writable by others or not "
                f"owned by uid {os.geteuid()}: anyone could replace the socket")
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlSetupError(f"control socket {self.path}: a Unix socket's path may "
                                    f"have at most {MAX_SOCKET_PATH} bytes")
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # born 0600: no moment where others may connect
        try:
            sock.bind(str(self.path))
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ControlSetupError(f"control socket {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        self.sock = sock
        self.loop.watch(sock.fileno(), self._accept)

    def adopt(self, sock: socket.socket) -> None:
        """Serve on a listening socket another server handed over (handover.py): the
        path stays bound throughout, so operators never find it gone."""
        sock.setblocking(False)
        self.sock = sock
        self.resume_accepting()

    def pause_accepting(self) -> socket.socket | None:
        """Stop accepting (the listener is being handed to another server); the
        listener, or None.  Connected clients are served on."""
        if self.sock is not None:
            self.loop.unwatch(self.sock.fileno())
        return self.sock

    def resume_accepting(self) -> None:
        if self.sock is not None and not self.loop.watching(self.sock.fileno()):
            self.loop.watch(self.sock.fileno(), self._accept)

    def _remove_stale(self) -> None:
        """A socket a dead server left behind is removed; a live one is another server's."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSetupError(f"control socket {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ControlSetupError(f"control socket {self.path}: {exc.strerror}") from exc
        finally:
            probe.close()
        raise ControlSetupError(f"control socket {self.path}: another shardlog serve "
                                "answers there")

    def descriptors(self) -> list:
        """Everything a forked worker must close."""
        return ([self.sock] if self.sock else []) + [c.sock for c in self.clients.values()]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("control socket: accept failed: %s", exc)
                return
            sock.setblocking(False)
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            client = Connection(self, sock)
            self.clients[client.fd] = client
            self.loop.watch(client.fd, client.on_ready)
            if uid != 0:
                log.warning("control socket: refused pid %d (uid %d): root only", pid, uid)
                client.send({"error": "permission denied: the control socket is root's"})
                client.finish()
            elif len(self.clients) > MAX_CLIENTS:
                client.send({"error": f"busy: {MAX_CLIENTS} clients connected"})
                client.finish()

    def dispatch(self, client: Connection, line: bytes) -> None:
        if client.close_when_sent:
            return  # refused already
        try:
            message = json.loads(line)
            command = self.commands[message["cmd"]]
        except (ValueError, KeyError, TypeError, RecursionError):  # nested too deep to parse
            client.send({"error": f"not a request: {line[:200].decode(errors='replace')}; "
                                  f"commands: {', '.join(sorted(self.commands))}"})
            return
        try:
            command(client, message)
        except (ValueError, KeyError, TypeError) as exc:
            client.send({"error": f"bad {message['cmd']} request: {exc}"})
        except Exception as exc:
            # An operator's request must never take the server (and the kernel's mirrors)
            # down with it: a bug here costs this client its answer, nothing more.
            log.exception("control socket: %s request failed", message["cmd"])
            client.send({"error": f"{message['cmd']} failed in the server: {exc!r}"})
            client.finish()

    def flush_streams(self) -> None:
        """Send the streamed lines queued during this wakeup (the loop calls this after
        its handlers)."""
        if self.unsent:
            clients, self.unsent = self.unsent, set()
            for client in clients:
                client.flush()

    def forget(self, client: Connection) -> None:
        self.unsent.discard(client)
        self.clients.pop(client.fd, None)
        self.loop.unwatch(client.fd)

    def close(self, *, unlink: bool = True) -> None:
        """Close every connection and the listener; ``unlink=False`` when another server
        took the listener over and answers at the path now."""
        for client in list(self.clients.values()):
            client.close()
        if self.sock is not None:
            self.pause_accepting()
            self.sock.close()
            self.sock = None
            if unlink:
                with contextlib.suppress(OSError):
                    self.path.unlink()


# -- the client side -------------------------------------------------------------------------


class ControlError(Exception):
    """Talking to the server failed; the message says why, for the operator (exit 1)."""


def connect(path: Path, timeout: float | None = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(f"shardlog is not running (nothing answers at {path})") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"permission denied: {path} is root's (run as root)") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
    return sock


def stream(path: Path, request: dict, timeout: float | None = 10.0) -> Iterator[dict]:
    """Send ``request``, then yield every object the server sends until it closes the
    connection.  An ``{"error": ...}`` from the server becomes ControlError."""
    sock = connect(path, timeout)
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if not isinstance(message, dict):  # another program's socket, perhaps
                    raise ControlError(f"{path} does not answer as shardlog does: "
                                       f"{line[:80].decode(errors='replace')!r}")
                if "error" in message:
                    raise ControlError(f"the server refused: {message['error']}")
                yield message
    except TimeoutError:
        raise ControlError(f"no answer from {path} within {timeout:.0f} s") from None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            raise ControlError(f"the server at {path} closed the connection") from None
        raise ControlError(f"{path}: {exc.strerror}") from None
    finally:
        sock.close()


def ask(path: Path, request: dict, timeout: float = 10.0) -> dict:
    """One request, one answer."""
    for message in stream(path, request, timeout):
        return message
    raise ControlError(f"the server at {path} closed the connection without an answer")
