"""`pg-edge serve`: a local HTTP server speaking the OpenAI chat format.

Files, by job: http_server.py (connections, shutdown), handler.py (one connection's requests),
wire.py (strict HTTP/1.1 heads), hosts.py (Host/Origin checks), endpoints.py (the routes),
gate.py (admission, the pixel budget), images.py (image URLs), openai_format.py (JSON shapes).

    from pg_edge.server import make_server
    server = make_server(pg, port=8080)        # pg = pg_edge.load(...)
    server.serve_forever()
"""
from .http_server import PgEdgeServer
from .images import ImagePolicy

__all__ = ["PgEdgeServer", "ImagePolicy", "make_server"]


def make_server(pg, host: str = "127.0.0.1", port: int = 8080, *, model_id: str | None = None,
                allow_remote_images: bool = False, files_root=None, **options) -> PgEdgeServer:
    """A bound (not yet serving) server for a loaded PaliGemma; port 0 picks a free one.
    options: api_key, max_body_bytes, max_tokens, queue_size, queue_timeout, vae, verbose,
    max_connections, pixel_budget, allowed_hosts, request_timeout, idle_timeout, write_timeout,
    fetch_seconds (a whole remote image fetch)."""
    from pathlib import Path

    model_id = model_id or (Path(pg.folder).name if pg.folder is not None else "paligemma")
    policy = ImagePolicy(allow_remote=allow_remote_images,
                         files_root=Path(files_root) if files_root is not None else None,
                         max_bytes=options.get("max_body_bytes", 20 * 2**20),
                         fetch_seconds=options.pop("fetch_seconds", 30.0))
    return PgEdgeServer(pg, (host, port), model_id=model_id, image_policy=policy, **options)
