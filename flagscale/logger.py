"""One logger factory with FlagScale's log format."""

import logging
import sys

_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def get_logger(name: str = "flagscale") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("flagscale")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
