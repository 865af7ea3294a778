"""The JSON response class of the error handlers and of the hot routes.

/recall and /rank build their bodies as plain dicts in the shape of their response models (service/schemas.py, which
the routes declare as `response_model`, so the OpenAPI contract is unchanged) and return them through orjson: FastAPI's
own path validates the body against the model and serialises it with pydantic, 80 µs for a 100-item answer against
20 µs here, on the event loop thread that every request shares (bench/README.md "serve.py").
"""

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
