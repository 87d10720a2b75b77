"""The token gate of `pvl-search serve --token`: with a token set, every request must carry
it, as `Authorization: Bearer <token>` (programs) or as the cookie that the sign-in form
sets (browsers: the page's fetch(), <img> and <video> requests send it by themselves).

The form posts the token to /sign-in, so it never sits in a URL, a history or a log; the
cookie is HttpOnly and SameSite=Strict, so scripts cannot read it and other sites cannot
make the browser send it.
"""

from __future__ import annotations

import hmac
import ipaddress
from html import escape
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pvl_web import SIGN_IN_PAGE

COOKIE = "pvl_search_token"
TOKEN_ENV = "PVL_SEARCH_TOKEN"
MIN_TOKEN_CHARS = 16
SIGN_IN_PATH = "/sign-in"
MAX_FORM_BYTES = 4096
SIGN_IN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (names other than localhost count
    as reachable from outside: they may resolve to anything)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(host: str, token: str | None) -> None:
    """Refuse (ValueError) to listen beyond loopback without a token, or with a weak one, or
    with one no client could send (HTTP headers and cookies carry visible ASCII only)."""
    if token is not None and not all("!" <= c <= "~" for c in token):
        # Never echo it: it is a secret (and may not even print).
        raise ValueError("the token must be visible ASCII characters only (letters, digits, punctuation; "
                         "no spaces or accents): HTTP headers cannot carry others")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token must be at least {MIN_TOKEN_CHARS} characters long, got {len(token)}")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"listening on {host} lets other machines search and download your videos: give a token "
            f"with --token or the {TOKEN_ENV} environment variable (or listen on 127.0.0.1)"
        )


class TokenGate:
    """ASGI middleware: requests without the token get 401 (the sign-in form for the page)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()
        self._form = SIGN_IN_PAGE.read_text(encoding="utf-8")

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    def allows(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self._matches(auth[7:].strip())
        return self._matches(request.cookies.get(COOKIE))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events carry no request
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if self.allows(request):
            await self.app(scope, receive, send)
            return
        if request.url.path == SIGN_IN_PATH and request.method == "POST":
            response = await self._sign_in(request)
        elif request.url.path == "/" and request.method in ("GET", "HEAD"):
            response = self._sign_in_form(status_code=401)
        else:
            response = JSONResponse(
                {"detail": "this server needs its token: send 'Authorization: Bearer <token>' "
                           "or sign in on the page at /"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )
        await response(scope, receive, send)

    async def _sign_in(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return self._sign_in_form("the form was too large", status_code=413)
        given = parse_qs(body.decode("utf-8", "replace")).get("token", [None])[0]
        if not self._matches(given):
            return self._sign_in_form("wrong token", status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, self._token.decode(), httponly=True, samesite="strict", path="/")
        return response

    def _sign_in_form(self, error: str = "", *, status_code: int) -> HTMLResponse:
        html = self._form.replace("{{error}}", escape(error))
        return HTMLResponse(html, status_code=status_code,
                            headers={"Content-Security-Policy": SIGN_IN_CSP, "Cache-Control": "no-store"})
