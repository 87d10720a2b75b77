"""The web page of `pvl-search serve` and the HTTP pieces server.py puts around it.

`static/` is plain HTML, CSS and JavaScript, shipped as package data and served as they are:
no build step, no node toolchain, and nothing the page loads comes from another host (its
Content-Security-Policy says so to the browser). `auth` is the token gate for a server that
listens beyond the loopback interface, `hosts` the Host check against DNS rebinding, `files`
how a media file is sent (Range, Content-Disposition), `guards` how the library's errors
become HTTP answers, `present` a search answer as the JSON of `/search` (with media URLs).
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = STATIC_DIR / "index.html"
SIGN_IN_PAGE = STATIC_DIR / "sign-in.html"
# Everything from this server only; inline scripts and styles refused too.
PAGE_CSP = ("default-src 'self'; img-src 'self'; media-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
