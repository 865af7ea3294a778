"""The framework floor for bench/serve.py: a bare FastAPI app whose POST /recall parses the service's request shape
(user_id, k, rerank, validated by pydantic) and answers a precomputed JSON body, serialised by orjson per request as
the service does, with no model, index or user state behind it. Served by uvicorn with the settings quiver-serve uses
(one worker, uvloop/httptools when installed, access log off).

    python bench/serve_floor.py --port 8001 [--body response.json]

--body: a real /recall response saved to a file (bench/serve.py captures one, so the floor answers the same bytes);
without it a same-shape body of --k items is synthesised. GET /readyz answers 200 at once.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.errors import JSON  # the service's own response class: the same orjson serialisation per request


class RecallRequest(BaseModel):
    """The request fields the benchmark sends (the service's model has more, all optional)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=256)
    k: int = Field(100, ge=1, le=1000)
    rerank: bool = False


def synthetic_body(k: int) -> dict[str, Any]:
    """A /recall-shaped answer of k items, sized like the real one (ids like the demo catalog's, full floats)."""
    items = [
        {"item_id": f"i{123456 + 7919 * j:06d}", "score": 0.8123456789 - j * 1.234567e-3, "interest": 0}
        for j in range(k)
    ]
    return {"items": items, "model_version": "0123456789abcdef", "index_version": "fedcba9876543210"}


def create_app(body: dict[str, Any]) -> FastAPI:
    app = FastAPI(title="quiver bench floor", default_response_class=JSON)

    @app.post("/recall")
    async def recall(req: RecallRequest) -> Response:
        return JSON(body)  # serialised per request, as the service serialises its answer

    @app.get("/readyz")
    async def readyz() -> Response:
        return JSON({"ready": True})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--body", default=None, help="JSON file: the body to answer (default: synthesised)")
    p.add_argument("--k", type=int, default=100, help="items in the synthesised body")
    args = p.parse_args(argv)
    body = json.loads(Path(args.body).read_text()) if args.body else synthetic_body(args.k)
    uvicorn.run(
        create_app(body),
        host=args.host,
        port=args.port,
        workers=1,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
