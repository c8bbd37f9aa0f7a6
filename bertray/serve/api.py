"""The HTTP surface: request and answer schemas, their limits, and errors that name the field.

Every malformed request is answered 4xx before it reaches the model: broken JSON, a body that is
not an object, neither or several of `texts` / `pairs` / `question` + `context`, an empty list,
more items than `max_items`, a text longer than `max_text_chars`, a value of the wrong type, an
input the model cannot take (texts for a question-answering model, pairs for a token tagger).
The answer is `{"detail": [{"field": "texts[2]", "message": ...}]}`, without echoing the input back.

An answer's predictions depend on the model's kind (`bertray.predict.outputs`): a label and its
score (classification, regression, question answering), the labels over the threshold with every
label's score (multilabel), or the entities of each text (token classification).
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from bertray.predict.kinds import Kind
from bertray.serve.settings import ServeSettings


class PredictRequest(BaseModel):
    """Exactly one of: `texts`; `pairs` ([first, second] each); `question` with `context`."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = Field(None, min_length=1, description="texts to classify")
    pairs: list[tuple[StrictStr, StrictStr]] | None = Field(None, min_length=1,
                                                            description="[first, second] text pairs to classify")
    question: StrictStr | None = Field(None, description="a question, answered from `context`")
    context: StrictStr | None = Field(None, description="the passage holding the answer to `question`")

    @model_validator(mode="after")
    def one_kind(self) -> "PredictRequest":
        given = [name for name in ("texts", "pairs") if getattr(self, name) is not None]
        if self.question is not None or self.context is not None:
            if self.question is None or self.context is None:
                raise ValueError("question and context: give both, or neither")
            given.append("question")
        if len(given) != 1:
            raise ValueError("give exactly one of: texts, pairs, or question with context"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class Prediction(BaseModel):
    """Classification, regression and question answering."""

    label: str = Field(description="the label name; the value as text for regression; the answer text")
    score: float = Field(description="the label's probability; the regression value; the answer's confidence")
    scores: dict[str, float] | None = Field(None, description="every label's probability (classification)")


class MultilabelPrediction(BaseModel):
    """Multilabel classification."""

    labels: list[str] = Field(description="the labels whose sigmoid score is over the model's threshold, "
                                          "highest first (empty when none is)")
    scores: dict[str, float] = Field(description="every label's sigmoid score")


class Entity(BaseModel):
    entity_group: str = Field(description="the tag without its B-/I- prefix, e.g. PER")
    score: float = Field(description="the mean probability of the group's token tags")
    word: str = Field(description="the group's tokens joined as the tokenizer decodes them")
    start: int = Field(description="the first character of the entity in the text")
    end: int = Field(description="one past its last character: text[start:end]")


class TokenPrediction(BaseModel):
    """Token classification (NER): grouped as transformers' token-classification pipeline with
    aggregation_strategy="simple"."""

    entities: list[Entity] = Field(description="the text's entities, in text order")


class PredictResponse(BaseModel):
    predictions: list[Prediction | MultilabelPrediction | TokenPrediction]
    model: str


class FieldError(Exception):
    """A request that is well-formed JSON but breaks a limit or does not fit the model."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def check_request(request: PredictRequest, settings: ServeSettings, kind: Kind) -> tuple[str, list[tuple[str, ...]]]:
    """The request's inputs as ("texts" | "pairs" | "question", rows of texts), within the limits
    and of the kind the model takes; `FieldError` naming the field otherwise."""
    name = "question" if request.question is not None else "texts" if request.texts is not None else "pairs"
    if name not in kind.inputs:
        raise FieldError(name, f"this is a {kind.what} model: send {kind.inputs_text}")
    if name == "question":
        for field, text in (("question", request.question), ("context", request.context)):
            _check_length(field, text, settings)
        return name, [(request.question, request.context)]
    items = request.texts if request.texts is not None else request.pairs
    if len(items) > settings.max_items:
        raise FieldError(name, f"at most {settings.max_items} items per request, got {len(items)}", status=413)
    for i, item in enumerate(items):
        if name == "texts":
            _check_length(f"texts[{i}]", item, settings)
        else:
            for j, text in enumerate(item):
                _check_length(f"pairs[{i}][{j}]", text, settings)
    return name, [(t,) if name == "texts" else tuple(t) for t in items]


def _check_length(field: str, text: str, settings: ServeSettings) -> None:
    if len(text) > settings.max_text_chars:
        raise FieldError(field, f"at most {settings.max_text_chars} characters, got {len(text)}", status=413)


def field_of(location: tuple[Any, ...]) -> str:
    """Pydantic's error location ("body", "pairs", 3, 1) as `pairs[3][1]`; "body" for the whole body."""
    parts = [p for p in location if p != "body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe(error: Mapping[str, Any]) -> dict[str, str]:
    """One of pydantic's/FastAPI's validation errors as {field, message}, without the input."""
    location = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":          # the location is ("body", character offset)
        reason = (error.get("ctx") or {}).get("error", "")
        at = f" at character {location[-1]}" if location and isinstance(location[-1], int) else ""
        return {"field": "body", "message": f"malformed JSON{at}{f' ({reason})' if reason else ''}"}
    return {"field": field_of(location), "message": str(error.get("msg", "invalid"))}


class BodyLimit:
    """413 for a request whose Content-Length is over `max_bytes`, before the body is read. A plain
    ASGI middleware: Starlette's `BaseHTTPMiddleware` costs a task and a stream copy per request."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                from fastapi.responses import JSONResponse

                answer = JSONResponse(status_code=413, content={"detail": [{
                    "field": "body", "message": f"at most {self.max_bytes} bytes, got {length.decode(errors='replace')}"}]})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_api(service: Any, settings: ServeSettings):
    """The FastAPI app of one replica; `service` is the deployment (`predict`, `health`, `stats`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    api = FastAPI(title="bertray prediction service",
                  description="Predictions of a fine-tuned BERT model: labels and scores for texts or text pairs, "
                              "labels over a threshold (multilabel), entities with their character spans "
                              "(token classification), answers for a question and a context.")

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [describe(e) for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @api.exception_handler(FieldError)
    async def limit(request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": [{"field": exc.field, "message": exc.message}]})

    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @api.post("/predict", response_model=PredictResponse, responses={
        413: {"description": "too many items, or a text or body over the limit"},
        422: {"description": "malformed request; `detail` names the field"}})
    async def predict(body: PredictRequest) -> PredictResponse:
        return await service.predict(body)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return service.health()

    @api.get("/stats")
    async def stats() -> dict[str, Any]:
        """Batches this replica ran: requests per batch and sequences per forward pass."""
        return service.stats.snapshot()

    return api
