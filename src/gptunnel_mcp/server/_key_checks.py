"""Users' GPTunnel keys checked with GPTunnel for the HTTP front end, whether they arrive as a
bearer (`_http.Gate`) or on the sign-in page (`_sign_in`), as cheaply as a flood of guesses
allows: one question per key at a time, a few at once, refused keys remembered, and refused
credentials counted per client address."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from .._accounts import Account
from .._engine import Engine
from .._exceptions import AuthenticationError, GPTunnelMCPError

logger = logging.getLogger("gptunnel_mcp")

#: Keys checked with GPTunnel at once; more wait their turn.
KEY_CHECKS_AT_ONCE = 4
#: The window in which refused credentials are counted per client address.
FAILURE_WINDOW = 60.0


@dataclass(frozen=True)
class Refused:
    """Why a key was not taken: GPTunnel refuses it (the default), `wait` seconds must pass
    first (too many refused from the address), or GPTunnel could not be asked (`unreachable`:
    nothing counted against the caller)."""

    wait: float = 0.0
    unreachable: bool = False


class KeyChecks:
    """`check` takes a key for its account, or says why not."""

    def __init__(self, engine: Callable[[], Engine], failures: FailedAttempts) -> None:
        self._engine = engine
        self.failures = failures
        self._at_once = anyio.CapacityLimiter(KEY_CHECKS_AT_ONCE)
        self._checking: dict[str, anyio.Event] = {}

    async def check(self, key: str, client: str) -> Account | Refused:
        """The account of `key`, sent from the address `client`, once GPTunnel accepts it."""
        engine = self._engine()
        accounts = engine.accounts
        account = accounts.for_key(key)
        # One question to GPTunnel per key at a time: the same key sent in parallel waits for it.
        while (pending := self._checking.get(account.owner)) is not None:
            await pending.wait()
        if accounts.is_known(account):
            return account
        if accounts.is_refused(account):
            return self.refuse(client)
        wait = self.failures.wait(client)
        if wait:
            return Refused(wait=wait)
        # Counted as a failure until GPTunnel says otherwise, so guesses sent in parallel count too.
        attempt = self.failures.add(client)
        done = self._checking[account.owner] = anyio.Event()
        try:
            async with self._at_once:
                await engine.authenticate(key)
        except AuthenticationError:
            accounts.refuse(account)
            return Refused()
        except GPTunnelMCPError as exc:
            self.failures.discard(client, attempt)
            logger.warning("could not check a key with GPTunnel: %s", exc)
            return Refused(unreachable=True)
        finally:
            del self._checking[account.owner]
            done.set()
        self.failures.discard(client, attempt)
        return account

    def refuse(self, client: str) -> Refused:
        """A credential refused without asking GPTunnel, counted against `client`'s address."""
        wait = self.failures.wait(client)
        if wait:
            return Refused(wait=wait)
        self.failures.add(client)
        return Refused()


class FailedAttempts:
    """Refused credentials per client address within a sliding window, for a bounded number of
    addresses (the longest quiet are forgotten first)."""

    def __init__(self, limit: int, window: float, *, clients: int = 10_000) -> None:
        self._limit = limit
        self._window = window
        self._clients = clients
        self._times: OrderedDict[str, list[float]] = OrderedDict()

    def wait(self, client: str) -> float:
        """Seconds until `client`'s credentials are looked at again (0: now); until then it is
        turned away with 429."""
        times = self._recent(client)
        return times[0] + self._window - time.monotonic() if len(times) >= self._limit else 0.0

    def add(self, client: str) -> float:
        stamp = time.monotonic()
        self._times[client] = [*self._recent(client), stamp]
        self._times.move_to_end(client)
        while len(self._times) > self._clients:
            self._times.popitem(last=False)
        return stamp

    def discard(self, client: str, stamp: float) -> None:
        times = self._times.get(client)
        if times is not None and stamp in times:
            times.remove(stamp)

    def _recent(self, client: str) -> list[float]:
        """The client's failures in the window, oldest first; a client with none is forgotten."""
        times = self._times.get(client)
        if times is None:
            return []
        since = time.monotonic() - self._window
        times[:] = [t for t in times if t > since]
        if not times:
            del self._times[client]
        return times
