"""A real S3 server for the tests: moto in server mode on 127.0.0.1, reached the way any
S3-compatible store (MinIO, …) is, through ``AWS_ENDPOINT_URL`` with dummy credentials.

The environment is set for the whole session, before any Ray the tests start, so that Ray's
worker processes (which inherit it) reach the same server as the driver.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager

import pytest

BUCKET = "capfilt-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server():
    """Start the server, point botocore / s3fs at it, yield an s3fs file system with BUCKET."""
    import moto.server as moto_server
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = pytest.MonkeyPatch()
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "FSSPEC_S3",
    ):
        env.delenv(name, raising=False)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        env.undo()
        server.stop()
