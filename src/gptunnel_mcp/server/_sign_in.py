"""The page where a user signs in with their GPTunnel key, between a host's /authorize and its
redirect URI: plain HTML, one form, no JavaScript.

The form is good for one pending authorization, from the browser that loaded it: its CSRF
field is an HMAC, under the server secret, of the request's handle and a random value the page
set as a cookie, so a form posted from elsewhere (or with another request's handle) is refused.
The key is checked once with GPTunnel; it is never written back into the page, a log or an
error. Keys are checked as bearer keys are (`_key_checks`): refused ones count against the
sender's address alike.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from mcp.server.auth.provider import construct_redirect_uri
from mcp.shared.auth import OAuthClientInformationFull
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._engine import Engine
from ._authorization import OAuthUrls, authorizations
from ._key_checks import KeyChecks, Refused

logger = logging.getLogger("gptunnel_mcp")

_COOKIE = "gptunnel_sign_in"
#: The form's fields are short; anything larger is not this form.
_MAX_FIELD_BYTES = 4096
_HEADERS = {
    "Cache-Control": "no-store",
    # The address holds the request's handle: it goes to no other site. ("no-referrer" would make
    # the browser send the form with "Origin: null", which the origin check refuses.)
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'",
}


class SignIn:
    """GET shows the form for `?request=<handle>`; POST checks it and sends the browser back to
    the client with a code."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        urls: OAuthUrls,
        client: Callable[[str], Awaitable[OAuthClientInformationFull | None]],
        keys: KeyChecks,
    ) -> None:
        self._engine = engine
        self._urls = urls
        self._client = client
        self._keys = keys
        self._secure = urls.sign_in.startswith("https://")

    async def handle(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._submit(request)
        return await self._show(request.query_params.get("request", ""))

    async def _show(self, handle: str, error: str | None = None, status: int = 200) -> Response:
        pending = await authorizations(self._engine()).request(handle) if handle else None
        if pending is None:
            return _gone()
        client = await self._client(pending.client_id)
        name = (client.client_name if client else None) or pending.client_id
        browser = secrets.token_urlsafe(16)
        page = _form(
            action=self._urls.sign_in,
            handle=handle,
            csrf=self._csrf(handle, browser),
            client=name,
            destination=_where(pending.redirect_uri),
            error=error,
        )
        response = HTMLResponse(page, status_code=status, headers=_HEADERS)
        response.set_cookie(
            _COOKIE,
            browser,
            max_age=3600,
            path=urlsplit(self._urls.sign_in).path,
            secure=self._secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def _submit(self, request: Request) -> Response:
        try:
            form = await request.form(max_files=0, max_fields=8, max_part_size=_MAX_FIELD_BYTES)
        except Exception:  # Starlette's parse errors differ by content type; all mean a bad post
            return _page("Not a sign-in", "<p>This was not sent by the sign-in form.</p>", 400)
        handle, csrf, key = (str(form.get(name) or "") for name in ("request", "csrf", "key"))
        browser = request.cookies.get(_COOKIE, "")
        if not browser or not hmac.compare_digest(csrf.encode(), self._csrf(handle, browser).encode()):
            return await self._show(
                handle, "This form was not sent from this page in this browser; enter your key again.", 403
            )
        address = request.client.host if request.client else ""
        wait = self._keys.failures.wait(address)
        if wait:
            return await self._too_many(handle, wait)
        key = key.strip()
        if not key:
            return await self._show(handle, "Enter your GPTunnel API key.", 400)
        engine = self._engine()
        if await authorizations(engine).request(handle) is None:
            return _gone()
        checked = await self._keys.check(key, address)
        if isinstance(checked, Refused):
            if checked.wait:
                return await self._too_many(handle, checked.wait)
            if checked.unreachable:
                return await self._show(
                    handle, "GPTunnel cannot be reached to check the key; try again shortly.", 503
                )
            return await self._show(
                handle,
                "GPTunnel does not accept this key. Check it in your GPTunnel account and try again.",
                400,
            )
        approved = await authorizations(engine).approve(handle, checked)
        if approved is None:
            return _gone()
        code, pending = approved
        # %r: a client_id is the client's word, and may hold line breaks.
        logger.info("a user signed in for the OAuth client %r", pending.client_id[:200])
        target = construct_redirect_uri(
            pending.redirect_uri, code=code, state=pending.state, iss=self._urls.issuer
        )
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        response.delete_cookie(_COOKIE, path=urlsplit(self._urls.sign_in).path)
        return response

    async def _too_many(self, handle: str, wait: float) -> Response:
        seconds = max(math.ceil(wait), 1)
        return await self._show(
            handle, f"Too many refused keys from your address: try again in {seconds} seconds.", 429
        )

    def _csrf(self, handle: str, browser: str) -> str:
        message = f"oauth-sign-in:{handle}:{browser}".encode()
        return hmac.new(self._engine().accounts.secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ShownRefusals:
    """The SDK's /authorize, except that a refused request is shown to the user, with a link
    back to the client, rather than sent there at once. The SDK sends its refusals to the
    client's redirect URI, and anybody may register a client with their own site there: a link
    to this server's /authorize that is bound to fail would otherwise be a link to their site
    (RFC 9700 4.11.2). The page says where its link goes."""

    authorize: ASGIApp
    sign_in: str

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused_to: str | None = None

        async def holding(message: Message) -> None:
            nonlocal refused_to
            if message["type"] == "http.response.start" and message["status"] in (302, 303):
                location = Headers(raw=message.get("headers", [])).get("location", "")
                if not location.startswith(f"{self.sign_in}?"):
                    refused_to = location
            if refused_to is None:
                await send(message)

        await self.authorize(scope, receive, holding)
        if refused_to is not None:
            await _refusal(refused_to)(scope, receive, send)


def _refusal(redirect: str) -> Response:
    query = parse_qs(urlsplit(redirect).query)
    reason = (query.get("error_description") or query.get("error") or ["the request was not valid"])[0]
    e = html.escape
    return _page(
        "The app's sign-in request was refused",
        f"<p>The app that sent you here asked for something this server does not allow: "
        f"{e(reason[:300])}.</p>\n"
        f'<p><a href="{e(redirect)}">Go back to {e(_where(redirect))}</a> to tell the app, or close '
        "this page.</p>",
        400,
    )


def _where(redirect_uri: str) -> str:
    """Where the browser goes after signing in, as a person recognises it: the site's name."""
    parts = urlsplit(redirect_uri)
    return parts.netloc or f"{parts.scheme}:"


def _gone() -> Response:
    return _page(
        "Sign-in link expired",
        "<p>This sign-in link has expired or was already used. Go back to the app you were connecting "
        "and connect again.</p>",
        400,
    )


_STYLE = """
body { font: 1rem/1.5 system-ui, sans-serif; max-width: 34rem; margin: 2rem auto; padding: 0 1rem; }
label { display: block; font-weight: 600; margin-top: 1rem; }
input[type=password] { width: 100%; box-sizing: border-box; font-size: 1rem; padding: .5rem; }
.hint { color: #444; font-size: .9rem; margin: .25rem 0; }
.error { color: #a00000; font-weight: 600; margin: .25rem 0; }
input[aria-invalid=true] { border: 2px solid #a00000; }
button { font-size: 1rem; padding: .5rem 1.25rem; margin-top: 1rem; }
"""


def _page(title: str, body: str, status: int) -> HTMLResponse:
    return HTMLResponse(_document(title, body), status_code=status, headers=_HEADERS)


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} – GPTunnel images</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{html.escape(title)}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _form(*, action: str, handle: str, csrf: str, client: str, destination: str, error: str | None) -> str:
    e = html.escape
    described = "key-hint key-error" if error else "key-hint"
    invalid = ' aria-invalid="true"' if error else ""
    error_text = f'<p id="key-error" class="error" role="alert">{e(error)}</p>\n' if error else ""
    return _document(
        "Sign in to GPTunnel images",
        f"<p><strong>{e(client)}</strong> asks to make images with your GPTunnel account. After you sign "
        f"in, you are sent back to <strong>{e(destination)}</strong>.</p>\n"
        f'<form method="post" action="{e(action)}">\n'
        f'<input type="hidden" name="request" value="{e(handle)}">\n'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">\n'
        '<label for="key">Your GPTunnel API key</label>\n'
        f'<input id="key" name="key" type="password" autocomplete="off" spellcheck="false" required '
        f'aria-describedby="{described}"{invalid}>\n'
        f"{error_text}"
        '<p id="key-hint" class="hint">It is checked once with GPTunnel, then kept encrypted on this '
        "server for this connection, until you disconnect. It is never shown to the app.</p>\n"
        '<button type="submit">Sign in</button>\n</form>\n'
        "<p>Not expecting this? Close this page: nothing is shared until you sign in.</p>",
    )
