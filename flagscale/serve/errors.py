"""Client-facing errors shared by the HTTP and openpi routes."""

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(Exception):
    """A client error: answered as {"success": false, "error": message} with `status`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def internal_error(what: str, error: BaseException) -> str:
    """The client's text for a 500: the error's type only, never its message or a traceback (they
    can name files and install paths); the server log has both."""
    return f"internal server error: {what} ({type(error).__name__}); see the server log"


def check_float32(field: str, array: np.ndarray) -> None:
    """Finite and within float32's range: the model computes in float32 (a finite float64 like
    1e39 would become inf there and a 500)."""
    if not np.isfinite(array).all():
        raise RequestError(400, f"{field}: contains NaN or infinite values")
    if array.size and np.abs(array).max() > FLOAT32_MAX:
        raise RequestError(
            400, f"{field}: contains values beyond the float32 range (|x| <= {FLOAT32_MAX:.4g})"
        )
