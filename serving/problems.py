"""Error answers of the API: the documented statuses, and 422 bodies that stay strict JSON and small
whatever a client sends (non-finite numbers, 20,000 junk keys, megabyte strings)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import JSONResponse

from features.on_demand import InvalidRecords
from serving.schemas import MAX_TEXT, Problem

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No or unknown API key in X-API-Key."},
    403: {"model": Problem, "description": "The API key lacks the scope this endpoint needs."},
    413: {"model": Problem, "description": "Request body or batch larger than the configured maximum."},
    503: {"model": Problem, "description": "No bundle published or loaded yet."},
}
NOT_FOUND = {404: {"model": Problem, "description": "Unknown merchant, report or bundle."}}
UNREADABLE = {400: {"model": Problem, "description": "The body cannot be parsed (not UTF-8, or nested too deep)."}}
NO_ON_DEMAND = {409: {"model": Problem, "description": "`records` sent, but the live model was trained on "
                                                        "another feature set than the service computes."}}
MAX_PROBLEMS = 20
"""Errors listed in one 422 body (or one batch item's detail); the rest are counted."""


class Refused(Exception):
    """A request the live bundle cannot answer: its HTTP status, where in the body and why."""

    def __init__(self, status: int, loc: list[Any], detail: str) -> None:
        super().__init__(detail)
        self.status, self.loc, self.detail = status, loc, detail

    def http(self) -> Exception:
        """As one request's error: a 422 body like a schema error's, or a plain `detail`."""
        if self.status == 422:
            return RequestValidationError([{"type": "value_error", "loc": tuple(self.loc), "msg": self.detail}])
        return HTTPException(self.status, self.detail)


def records_rejected(exc: InvalidRecords) -> RequestValidationError:
    """One error per failed rule, at the table and column it names (a long message, such as a list of
    unknown columns, cut short)."""
    return RequestValidationError([
        {"type": "value_error", "loc": ("body", "records", f.table, *f.columns[:1]), "msg": short(str(f), 500)}
        for f in exc.failures
    ])


def now() -> datetime:
    """The request's time, naive UTC as the data model's timestamps."""
    return datetime.now(UTC).replace(tzinfo=None)


def short(value: Any, length: int = MAX_TEXT) -> Any:
    return value[:length] + "..." if isinstance(value, str) and len(value) > length else value


def problems(errors: list[dict[str, Any]], loc: list[Any]) -> list[dict[str, Any]]:
    """`problem` of each error, the first `MAX_PROBLEMS` of them: a body of 20,000 junk keys gets a short
    refusal, not one line per key."""
    listed = [problem(error, loc) for error in errors[:MAX_PROBLEMS]]
    if len(errors) > MAX_PROBLEMS:
        listed.append({"type": "too_many_errors", "loc": [*loc] or ["body"],
                       "msg": f"{len(errors) - MAX_PROBLEMS} more problems not listed"})
    return listed


def problem(error: dict[str, Any], loc: list[Any]) -> dict[str, Any]:
    """A pydantic error as strict JSON that cannot grow with the input: the offending value is echoed only
    when it is a finite number, a boolean or short text, and a long key in `loc` is cut short."""
    value = error.get("input")
    loc = [short(part) for part in (*loc, *error["loc"])]
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = (f"unknown feature '{loc[-1]}': not in the feature catalogue (GET /v1/model lists the inputs)"
                   if "features" in loc[:-1] else f"unknown field '{loc[-1]}'")
    answer = {"type": error["type"], "loc": loc, "msg": message}
    safe = (value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value))
            or (isinstance(value, str) and len(value) <= MAX_TEXT))
    if safe and "input" in error:
        answer["input"] = value
    return answer


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Every 422 of the API, schema or ours, in the one strict shape."""
    return JSONResponse({"detail": problems(list(exc.errors()), [])}, status_code=422)
