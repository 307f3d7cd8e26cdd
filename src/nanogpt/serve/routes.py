"""The model routes of `nanogpt serve`: `GET /v1/models` (the one served model) and `GET /v1/models/{id}`.

The card is OpenAI's model object (id, object, created, owned_by) plus vLLM's `max_model_len`, the
context length. Any id other than the served one is a 404 "model_not_found"; ids may hold slashes
("org/model"), as the openai SDK sends them unescaped.

    add_model_routes(app, "tiny", context_length=1024)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nanogpt.serve.errors import model_not_found

if TYPE_CHECKING:
    from starlette.responses import JSONResponse


def model_card(name: str, context_length: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "nanogpt",
        "max_model_len": context_length,
    }


def add_model_routes(app: Any, name: str, context_length: int) -> None:
    """Register GET /v1/models and GET /v1/models/{model_id} on the FastAPI `app`."""
    card = model_card(name, context_length)

    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    def model(model_id: str) -> dict[str, Any] | JSONResponse:
        return card if model_id == name else model_not_found(model_id, name, param=None)

    app.add_api_route("/v1/models", models, methods=["GET"])
    # response_model=None: FastAPI would otherwise build a response model from the annotation (a 404 is a Response)
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], response_model=None)
