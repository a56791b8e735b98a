"""Start the API: ``python -m service [--host H] [--port P]`` (settings from TTASEG_* variables)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.config import get_settings


def app_from_environment() -> FastAPI:
    """The API for the ``TTASEG_*`` environment (uvicorn's application factory)."""
    return create_app(get_settings())


def main() -> None:
    """Run the API under uvicorn."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        "service.__main__:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
