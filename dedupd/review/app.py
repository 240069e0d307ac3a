"""The review web app (Flask, served by waitress): the quarantine as pairs of thumbnails,
filters, keyset paging, and actions.

Security: actions are POSTs carrying a CSRF token (Flask-WTF); the Host header must name
this server (no DNS rebinding from a web page); away from loopback every request needs
the access token printed at start (then kept in a cookie); read-only refuses every
action; no JavaScript, and a Content-Security-Policy allowing only this origin.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, abort, flash, redirect, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect

from dedupd.quarantine import QuarantineError
from dedupd.review.model import ACTIONS, FLAG_LABELS, PAGE_SIZE, Review, parse_day, shown
from dedupd.review.thumbs import ThumbnailCache, ThumbnailError
from dedupd.store.base import QuarantineFilter

log = logging.getLogger("dedupd.review")

TOKEN_COOKIE = "dedupd_review_token"
FILTER_KEYS = ("root", "policy", "dmin", "dmax", "since", "until", "flag")
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def to_int(value: object) -> int:
    """An integer a database column can hold (ValueError otherwise: a 400, not a 500)."""
    number = int(value)  # type: ignore[call-overload]
    if not -(2**63) <= number < 2**63:
        raise ValueError(f"{value} is out of range")
    return number


def filter_from(args: dict[str, Any]) -> QuarantineFilter:
    """The filter a query string (or the gallery's options) asks for; ValueError if bad."""

    def number(key: str) -> int | None:
        value = args.get(key)
        return None if value is None or value == "" else to_int(value)

    flag = args.get("flag") or None
    if flag is not None and flag not in FLAG_LABELS:
        raise ValueError(f"{flag} is not a flag")
    return QuarantineFilter(root=args.get("root") or None, policy=args.get("policy") or None,
                            min_distance=number("dmin"), max_distance=number("dmax"),
                            since=parse_day(args.get("since")),
                            until=parse_day(args.get("until"), end=True), flag=flag)


def create_app(review: Review, thumbs: ThumbnailCache, *, host: str, port: int,
               read_only: bool = False, token: str | None = None) -> Flask:
    """The app for one store. token: required of every request (None on loopback)."""
    app = Flask("dedupd.review")
    app.config.update(SECRET_KEY=secrets.token_bytes(32), WTF_CSRF_TIME_LIMIT=None,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_HTTPONLY=True,
                      MAX_CONTENT_LENGTH=1 << 20)
    bind_port(app, host, port)
    app.jinja_env.globals.update(shown=shown, flags=FLAG_LABELS)

    @app.before_request
    def guard() -> Response | None:
        if token is None and request.host.lower() not in app.config["REVIEW_HOSTS"]:
            abort(400, "unexpected Host header")  # a rebound DNS name on loopback
        if token is not None:
            given = request.args.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                abort(403, "this review server needs its access token (see its start-up line)")
        if read_only and request.method not in ("GET", "HEAD"):
            abort(403, "this review server is read-only")
        return None

    CSRFProtect(app)  # after the guard: a read-only or tokenless request stops there

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if token is not None and request.args.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    @app.errorhandler(CSRFError)
    def csrf_refused(exc: CSRFError) -> tuple[str, int]:
        log.warning("review: refused an action without a valid CSRF token: %s",
                    exc.description)
        return f"refused: {exc.description}\n", 400

    @app.get("/")
    def index() -> str:
        args = {k: request.args.get(k, "") for k in FILTER_KEYS}
        try:
            where = filter_from(args)
            before = _int_arg("before")
            after = _int_arg("after")
        except ValueError:
            abort(400, "bad filter")
        page = review.page(where, before=before, after=after, limit=PAGE_SIZE)
        query = {k: v for k, v in args.items() if v}
        return render_template(
            "review.html", page=page, review=review, args=args, static=False,
            css="/static/review.css",
            read_only=read_only, actions=ACTIONS,
            thumb=lambda entry_id, side: f"/thumb/{entry_id}/{side}",
            link=lambda **more: "/?" + urlencode({**query, **more}),
            first_link="/?" + urlencode(query))

    @app.get("/pending")
    def pending() -> str:
        rows, total = review.pending()
        return render_template("pending.html", rows=rows, total=total,
                               css="/static/review.css", back="/",
                               thumb=lambda record_id, side: f"/thumb/pending/{record_id}/{side}")

    @app.get("/thumb/pending/<int:record_id>/<side>")
    def pending_thumbnail(record_id: int, side: str) -> Response:
        return _thumbnail(review.pending_thumbnail_path(record_id, side))

    @app.get("/thumb/<int:entry_id>/<side>")
    def thumbnail(entry_id: int, side: str) -> Response:
        return _thumbnail(review.thumbnail_path(entry_id, side))

    def _thumbnail(path: str | None) -> Response:
        if path is None:
            abort(404)
        try:
            data = thumbs.get(path)
        except ThumbnailError:
            abort(404)
        return Response(data, mimetype="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.post("/action")
    def action() -> Response:
        chosen = request.form.get("act", "")
        name, _, one = chosen.partition(":")
        ids = [one] if one else request.form.getlist("ids")
        if name not in ACTIONS:
            abort(400, "unknown action")
        for entry_id in _ids(ids):
            try:
                flash(review.act(name, entry_id))
            except QuarantineError as exc:
                flash(shown(f"not done: {exc}"), "error")
        back = {k: request.form.get(k, "") for k in (*FILTER_KEYS, "before", "after")}
        return redirect("/?" + urlencode({k: v for k, v in back.items() if v}), code=303)

    return app


def _int_arg(key: str) -> int | None:
    value = request.args.get(key)
    return to_int(value) if value else None


def _ids(values: Iterable[str]) -> list[int]:
    out = []
    for v in values:
        if not v.isdigit() or len(v) > 18:
            abort(400, "entries are named by id")
        out.append(int(v))
    return out[:1000]


def bind_port(app: Flask, host: str, port: int) -> None:
    """The Host headers this server answers on loopback (set again once port 0 is bound)."""
    app.config["REVIEW_HOSTS"] = _host_names(host, port)


def _host_names(host: str, port: int) -> set[str]:
    names = {host, f"[{host}]" if ":" in host else host}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    return {f"{n}:{port}".lower() for n in names} | ({n.lower() for n in names}
                                                      if port == 80 else set())
