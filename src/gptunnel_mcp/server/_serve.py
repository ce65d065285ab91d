"""Running the MCP server on the configured transport until it is stopped."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

import anyio

from .._exceptions import ConfigError
from .._settings import Settings
from .._wiring import loop_factory, run_async

if TYPE_CHECKING:
    from mcp.server import MCPServer

logger = logging.getLogger("gptunnel_mcp")

#: The exit code after Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130


def serve(settings: Settings, log_level: str) -> int:
    """Serve until stopped; the process's exit code. Raises `ConfigError` when the HTTP address
    cannot be listened on."""
    if settings.sandbox:
        logger.warning("sandbox mode: no real images, no cost; history in %s", settings.home)
    elif settings.api_key is None and not settings.multi_user:
        logger.warning("GPTUNNEL_API_KEY is not set: tools will ask for it; stored images stay readable")
    if settings.transport == "http":
        return _serve_http(settings, log_level)
    from ._build import build_server

    return _serve_stdio(settings, build_server(settings))


# --- HTTP -------------------------------------------------------------------------------------


def _serve_http(settings: Settings, log_level: str) -> int:
    from ._http import MCP_PATH, build_http_app, http_server

    # Bound here rather than by uvicorn, which reports a busy port with the exit code 3 (here:
    # "still pending") after the whole app has started.
    with _listen(settings.host, settings.port) as sock:
        # uvicorn takes the loop as "module:factory"; psycopg needs one on Windows (`loop_factory`).
        factory = loop_factory(settings)
        loop = "auto" if factory is None else f"{factory.__module__}:{factory.__qualname__}"
        server = http_server(
            settings, build_http_app(settings), log_level=log_level.lower(), log_config=None, loop=loop
        )
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        port = sock.getsockname()[1]
        logger.info("serving MCP at http://%s:%d%s (health: /healthz)", host, port, MCP_PATH)
        try:
            server.run(sockets=[sock])
        except SystemExit:
            # uvicorn's way to say the app failed to start (it has logged why).
            if server.started:
                raise
            return 1
    return 0


def _listen(host: str, port: int) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every keep-alive request waits ~40 ms for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt":
            # As uvicorn does: a restart may take over the port while the old connections linger
            # in TIME_WAIT. (On Windows the option would let two servers share one port.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        advice = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host and --port"
        raise ConfigError(f"cannot listen on {where}: {reason}; {advice}") from None
    return sock


# --- stdio ------------------------------------------------------------------------------------


def _serve_stdio(settings: Settings, server: MCPServer[Any]) -> int:
    """Serve on stdin/stdout until stdin ends (the client is gone) or Ctrl-C.

    The SDK reads stdin in a worker thread, and a cancelled event loop waits for that thread,
    that is for the next line a person at a terminal may never type. So stdin is relayed to
    the SDK through a socket pair by a daemon thread: Ctrl-C ends the relay (the SDK sees the
    end of its input, as when a client closes the pipe) and cancels what is in flight, and
    the server shuts down in order: the engine closes the history and its HTTP clients, the
    last answers are written whole. Only the relay thread is left, blocked on the real stdin,
    and a daemon thread does not hold up the exit. (`os._exit` would be shorter, but could
    cut off a history write or an answer half-way.)
    """
    if os.name == "nt":
        # The event loop cannot take signals on Windows: the SDK's own handling of Ctrl-C.
        run_async(settings, server.run_stdio_async)
        return 0
    wire = os.dup(0)
    sink, source = socket.socketpair()
    threading.Thread(target=_relay, args=(wire, sink), name="stdin relay", daemon=True).start()
    # As the SDK does for the stdin it reads itself: whatever else reads fd 0 (a child
    # process, a stray input()) finds it empty instead of taking the client's messages.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    saved_stdin, sys.stdin = sys.stdin, io.TextIOWrapper(source.makefile("rb"), encoding="utf-8")
    interrupted = False

    async def serve_until_stopped() -> None:
        async with anyio.create_task_group() as tasks:

            async def stop_on_ctrl_c() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT) as signals:
                    async for _ in signals:
                        interrupted = True
                        _end_input(sink)
                        tasks.cancel_scope.cancel()

            tasks.start_soon(stop_on_ctrl_c)
            await server.run_stdio_async()
            tasks.cancel_scope.cancel()

    try:
        run_async(settings, serve_until_stopped)
    finally:
        sys.stdin = saved_stdin
        os.dup2(wire, 0)
    if interrupted:
        logger.info("stopped (Ctrl-C)")
        return EXIT_INTERRUPTED
    return 0


def _relay(wire: int, sink: socket.socket) -> None:
    # `wire` stays open even after this returns: the descriptor is never recycled under a read.
    try:
        while chunk := os.read(wire, 65536):
            sink.sendall(chunk)
    except OSError:
        pass  # stdin broke, or Ctrl-C shut the relay: the server's input ends either way
    finally:
        _end_input(sink)


def _end_input(sink: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already shut
        sink.shutdown(socket.SHUT_WR)
