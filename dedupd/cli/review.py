"""`dedupd review`: look at what dedupd took out before trusting a threshold.

A small web UI over the quarantine journal (loopback by default), or with --html DIR the
same view written as a static gallery. Runs as the service's user, against the store and
quarantine directory of the configuration it is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.cli.output import CommandError, UsageError, print_error, print_result
from dedupd.config import Config, parse_listen
from dedupd.events import setup_logging
from dedupd.store import open_store
from dedupd.store.records import FLAGS

if TYPE_CHECKING:  # the web stack is imported only when the command runs
    from dedupd.review.model import Review
    from dedupd.review.thumbs import ThumbnailCache

DEFAULT_LISTEN = "127.0.0.1:9469"


def cmd_review(args: argparse.Namespace, config: Config) -> int:
    from dedupd.review.model import Review
    from dedupd.review.thumbs import ThumbnailCache, default_cache_dir

    try:
        host, port = parse_listen(args.listen, any_port=True)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    given = [_option(dest) for dest, *_ in (*HTML_FILTERS, ("limit",))
             if getattr(args, dest) is not None]
    if given and not args.html:  # else silently ignored: the live page filters by URL
        raise UsageError(f"{', '.join(given)}: only with --html (the live page takes its "
                         "filters in its URL, e.g. ?flag=transform)")
    setup_logging(args.log or config.log.mode, config.log.level)
    store = open_store(config.index, create=False)
    try:
        review = Review(config, store)
        thumbs = ThumbnailCache(Path(args.cache) if args.cache else default_cache_dir(),
                                config.max_pixels)
        if args.html:
            return _write_html(args, review, thumbs)
        return _serve(args, review, thumbs, host, port)
    finally:
        store.close()


def _write_html(args: argparse.Namespace, review: Review, thumbs: ThumbnailCache) -> int:
    from dedupd.review.app import filter_from
    from dedupd.review.gallery import write_gallery

    try:
        where = filter_from({key: getattr(args, dest) for dest, key, *_ in HTML_FILTERS})
    except ValueError as exc:
        raise UsageError(f"bad filter: {exc}") from None
    out = Path(args.html)
    counts = write_gallery(review, thumbs, out, where, args.limit)
    print_result(args.json, {"html": str(out / "index.html"), **counts},
                 f"wrote {out / 'index.html'}: {counts['entries']} entries on {counts['pages']} "
                 f"pages, {counts['thumbnails']} thumbnails")
    return 0


def _serve(args: argparse.Namespace, review: Review, thumbs: ThumbnailCache, host: str,
           port: int) -> int:
    import secrets

    import waitress

    from dedupd.review.app import bind_port, create_app, is_loopback

    token = None
    if not is_loopback(host):
        token = secrets.token_urlsafe(24)
        print_error(f"warning: review bound to {host}, beyond this machine: every request "
                    "needs the access token in the URL below (keep it secret)")
    app = create_app(review, thumbs, host=host, port=port, read_only=args.read_only,
                     token=token)
    try:
        server = waitress.create_server(app, host=host, port=port, threads=4)
    except OSError as exc:
        raise CommandError("os", f"cannot listen on {args.listen}: {exc.strerror or exc}") \
            from None
    bound = server.effective_port  # type: ignore[union-attr]
    bind_port(app, host, bound)
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{bound}/" + (f"?token={token}" if token else "")
    print_result(args.json, {"url": url, "read_only": args.read_only},
                 f"review: {url}{' (read-only)' if args.read_only else ''}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN}; port 0 picks one). "
                   "Away from loopback a warning is printed and an access token required")
    p.add_argument("--read-only", action="store_true", help="show, never act")
    p.add_argument("--html", metavar="DIR",
                   help="write the view as a static gallery in DIR instead of serving")
    p.add_argument("--limit", type=int, metavar="N", help="--html: at most N entries")
    p.add_argument("--cache", metavar="DIR", help="thumbnail cache (default "
                   "$CACHE_DIRECTORY or ~/.cache/dedupd/thumbnails)")
    filters = p.add_argument_group(
        "filters of --html",
        "The live page's filters (its query parameter in parentheses): the gallery's pages\n"
        "and its pending.html show only the duplicates that pass every one given.")
    for dest, key, kind, metavar, text in HTML_FILTERS:
        filters.add_argument(_option(dest), dest=dest, type=kind,
                             metavar=metavar, help=f"{text} (?{key}=)")
    p.epilog = ("example: the mirror images and rotations found since 1 March, for a ticket:\n"
                "  dedupd review --html /tmp/flips --flag transform --since 2026-03-01")


def _option(dest: str) -> str:
    """The option of an argparse dest, to name it in an error as the user typed it."""
    return "--" + dest.replace("_", "-")


def _day(text: str) -> str:
    """A --since/--until value, checked while parsing: a bad day is a one-line usage
    error naming the option, as the live page answers 400."""
    from dedupd.review.model import parse_day

    try:
        parse_day(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD, UTC)") from None
    return text


def _flag(text: str) -> str:
    """A --flag value: one the journal has (argparse's choices would print a usage block
    before the error, not one line)."""
    if text not in FLAGS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a flag ({' or '.join(FLAGS)})")
    return text


# --html's filters as (option's dest, the live page's query key, type, metavar, help):
# one table, so that the gallery takes exactly the filters the page does.
HTML_FILTERS: tuple[tuple[str, str, Callable[[str], object], str, str], ...] = (
    ("root", "root", str, "DIR",
     "only duplicates found under DIR, a watched root (or a directory below one)"),
    ("policy", "policy", str, "NAME", "only duplicates decided by policy NAME"),
    ("min_distance", "dmin", int, "N",
     "only duplicates at Hamming distance N or more from the image they matched"),
    ("max_distance", "dmax", int, "N",
     "only duplicates at distance N or less (0: visually identical or the same bytes)"),
    ("since", "since", _day, "YYYY-MM-DD",
     "only duplicates quarantined (unresolved: first seen) on or after this UTC day"),
    ("until", "until", _day, "YYYY-MM-DD", "only those on or before this UTC day"),
    ("flag", "flag", _flag, "transform|low_information",
     "only duplicates matched as a mirror image or rotation (transform, with "
     "match_flips_rotations), or flat images whose hash alone says little "
     "(low_information)"),
)
