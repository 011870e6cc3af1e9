"""Client-facing errors shared by the HTTP and openpi routes."""


class RequestError(Exception):
    """A client error: answered as {"success": false, "error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
