"""`dedupd review --html DIR`: the review page as a static gallery (for a ticket or an
email), thumbnails included, no server and no actions."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from dedupd.review.model import PAGE_SIZE, Review, now_text, shown
from dedupd.review.thumbs import ThumbnailCache, ThumbnailError
from dedupd.store.base import QuarantineFilter

PENDING_PAGE = "pending.html"


def page_name(n: int) -> str:
    return "index.html" if n == 1 else f"page-{n}.html"


def write_gallery(review: Review, thumbs: ThumbnailCache, out: Path,
                  where: QuarantineFilter, limit: int | None = None) -> dict[str, int]:
    """Write index.html, page-2.html, ..., pending.html (if any are unresolved) and
    thumbs/ under out; returns counts."""
    env = Environment(loader=PackageLoader("dedupd.review", "templates"),
                      autoescape=select_autoescape(["html"]))
    env.globals["shown"] = shown
    template = env.get_template("review.html")
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("static") / "review.css", out / "review.css")
    counts = {"pages": 0, "entries": 0, "thumbnails": 0, "pending": 0}
    made: set[str] = set()

    def copy_thumbnail(name: str, path: str | None) -> str:
        """name (under out) holding the thumbnail of path, or "" if there is none."""
        if name not in made:
            try:
                data = thumbs.get(path) if path else None
            except ThumbnailError:
                data = None
            if data is None:
                return ""
            (out / name).write_bytes(data)
            made.add(name)
            counts["thumbnails"] += 1
        return name

    def thumb(entry_id: int, side: str) -> str:
        return copy_thumbnail(f"thumbs/{entry_id}-{side}.jpg",
                              review.thumbnail_path(entry_id, side))

    def pending_thumb(record_id: int, side: str) -> str:
        return copy_thumbnail(f"thumbs/pending-{record_id}-{side}.jpg",
                              review.pending_thumbnail_path(record_id, side))

    generated = now_text()
    # Duplicates still in place because their quarantine failed, as the live /pending,
    # narrowed by the same filters as the pages.
    rows, pending_total = review.pending(where)
    counts["pending"] = pending_total
    if pending_total:
        (out / PENDING_PAGE).write_text(env.get_template("pending.html").render(
            rows=rows, total=pending_total, css="review.css", back=page_name(1),
            thumb=pending_thumb, generated=generated, filtered=where.narrows),
            encoding="utf-8")
    pending_link = PENDING_PAGE if pending_total else None
    before, n = None, 1
    while True:
        size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - counts["entries"])
        page = review.page(where, before=before, limit=size)
        counts["entries"] += len(page.rows)
        older = page.older if limit is None or counts["entries"] < limit else None
        view = replace(page, newer=n - 1 if n > 1 else None, older=older)
        html = template.render(
            page=view, review=review, args={}, static=True, read_only=True,
            css="review.css", thumb=thumb, generated=generated, first_link=page_name(1),
            pending_link=pending_link, pending_total=pending_total,
            link=lambda after=None, before=None, _n=n: page_name(_n - 1 if after else _n + 1))
        (out / page_name(n)).write_text(html, encoding="utf-8")
        counts["pages"] += 1
        if older is None:
            return counts
        before, n = older, n + 1
