"""gRPC core's own log lines, made readable in the server log."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("shoal.federated.server")


def log_tls_refusals() -> None:
    """Route gRPC core's handshake failures (plaintext, unknown CA, bad certificate) into the server log.

    They happen before any Python code sees the call, and gRPC core writes them only to file
    descriptor 2, at INFO level; so fd 2 goes through a pipe, read by a thread that turns
    "Handshake failed" lines into log records and passes every other non-INFO line through.
    Must run before grpc is first imported.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(original, "w", buffering=1)
    for handler in logging.getLogger().handlers:  # Python's own logging keeps the real stderr
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(out)

    def pump() -> None:
        with os.fdopen(read_end, errors="replace") as lines:
            for line in lines:
                if "Handshake failed" in line:
                    log.warning("refused a TLS connection: %s", line.split("]", 1)[-1].strip())
                elif not (line[:1] == "I" and line[1:5].isdigit()) and "Log level INFO" not in line:
                    out.write(line)

    threading.Thread(target=pump, daemon=True, name="grpc-log").start()
