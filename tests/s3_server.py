"""A real S3 API on 127.0.0.1 for the tests and benchmarks of datasets by URL: moto's server (the
app ThreadedMotoServer serves, as s3fs tests itself) behind a request log, so a test can see every
read a process made (its GETs, their Range headers and the bytes sent back)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True)
class Request:
    pid: int | None  # the process that sent it, when it is this one or a descendant (Ray's workers)
    method: str
    path: str  # /bucket/key
    range: tuple[int, int] | None  # [start, stop) asked by a Range header; None: the whole object
    sent: int  # body bytes sent back
    seconds: float  # the server's own time on it (moto's), before the first byte is sent


def asked_range(header: str | None) -> tuple[int, int] | None:
    """'bytes=A-B' (B inclusive) -> [A, B + 1)."""
    if not header:
        return None
    first, last = header.removeprefix("bytes=").split("-")
    return int(first), int(last) + 1


def client_pid(port: int, server_port: int) -> int | None:
    """The process holding the client end (127.0.0.1:port -> server_port), among this one and its
    descendants: on loopback both ends are ours to see."""
    import psutil

    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            for conn in process.net_connections("tcp"):
                if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == server_port:
                    return process.pid
        except psutil.Error:  # a helper that ended while being looked at
            continue
    return None


class RecordingS3Server:
    """moto's S3 on 127.0.0.1 (a free port), each request logged; `who_asked` also finds each read's
    process (a few ms a request: for tests, not for benchmarks)."""

    def __init__(self, who_asked: bool = False):
        self.requests: list[Request] = []
        self._lock, self._who_asked = threading.Lock(), who_asked

    def start(self) -> "RecordingS3Server":
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        moto_app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._logged(moto_app), True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def reads(self, path: str) -> list[Request]:
        """The GETs of the object at /bucket/key `path`."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _logged(self, app):
        def logged(environ, start_response):
            pid = None
            if self._who_asked and environ["REQUEST_METHOD"] == "GET":
                pid = client_pid(int(environ["REMOTE_PORT"]), self._server.server_address[1])
            started = time.perf_counter()
            body = app(environ, start_response)
            try:
                chunks = list(body)
            finally:
                if hasattr(body, "close"):
                    body.close()
            # logged before a byte is sent: a client that has its answer finds its request in the log
            request = Request(pid, environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")),
                              asked_range(environ.get("HTTP_RANGE")), sum(map(len, chunks)),
                              time.perf_counter() - started)
            with self._lock:
                self.requests.append(request)
            return chunks
        return logged


def use_endpoint(monkeypatch, endpoint: str, scratch) -> None:
    """This process (and the Ray it starts) reaches `endpoint` as a node would: credentials and endpoint
    in the environment alone (dummy keys: moto accepts any), no AWS profile or config file."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(scratch / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def fresh_bucket(server: "RecordingS3Server", monkeypatch, scratch):
    """A fixture's body: yields (s3fs filesystem, a fresh bucket's name) reached as a node would (use_endpoint),
    with s3fs's cached filesystems dropped before and after."""
    import uuid

    import s3fs

    use_endpoint(monkeypatch, server.endpoint, scratch)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"raygrad-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()


class CharTokenizer:
    """One token per 4 characters, plus BOS: the planner needs the tokenizer alone."""

    def __call__(self, texts):
        return {"input_ids": [[0] * (1 + len(text) // 4) for text in texts]}
