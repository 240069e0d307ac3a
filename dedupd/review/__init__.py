"""The review page: a small web UI over the quarantine journal (model, app, thumbnails,
static gallery). The `dedupd review` command that starts it is dedupd.cli.review."""
