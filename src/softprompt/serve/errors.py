"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


def model_not_found(name: str) -> APIError:
    """The same answer for a prompt that does not exist and one the key may not use."""
    return APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")
