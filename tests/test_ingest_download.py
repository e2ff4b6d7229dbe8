"""Downloader against a real HTTP server on 127.0.0.1: every reject reason, retries, opt-out.

The server runs in a background thread for the whole module. Routes that must not have their
body read (byte cap by Content-Length, opt-out) send headers and then stall: if the client read
the body anyway it would end in "timeout" instead of the expected reason.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from diffusion.config import DownloadConfig
from diffusion.data.ingest.core import Rejected
from diffusion.data.ingest.download import Downloader, opted_out, parse_retry_after, retry_delay

TIMEOUT = 0.5  # client timeout in these tests; stalls last longer than this
STALL = 2.0  # how long a stalling route holds its connection (released early at teardown)
MAX_BYTES = 4096
SLOW = 0.4  # server-side delay of /slow, for the concurrency test


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the concurrency test opens many connections at once

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()  # requests per path, to count retries
        self.user_agents: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()  # wakes stalled handlers at teardown


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like real image hosts
    server: _Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
            hit = self.server.hits[self.path]
            self.server.user_agents.append(self.headers.get("User-Agent", ""))
        route = self.path.split("/")[1]  # "/flaky/a" -> "flaky": one counter per test
        try:
            getattr(self, "route_" + route.replace("-", "_").replace(".", "_"), self.route_404)(hit)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (cap, opt-out, timeout)

    # -- helpers -------------------------------------------------------------------------

    def send(self, status: int, body: bytes, headers: list[tuple[str, str]]):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_chunked(self, chunks, content_type: str = "image/png"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for c in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def headers_then_stall(self, headers: list[tuple[str, str]]):
        self.send_response(200)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()
        self.server.stop.wait(STALL)
        self.close_connection = True

    # -- routes --------------------------------------------------------------------------

    def route_404(self, hit):
        self.send(404, b"not found", [("Content-Type", "text/plain")])

    def route_ok_png(self, hit):
        self.send(200, PNG, [("Content-Type", "image/png")])

    def route_notype(self, hit):
        self.send(200, PNG, [])

    def route_nolength(self, hit):
        self.send_chunked([PNG[:20], PNG[20:]])

    def route_octet(self, hit):
        self.send(200, PNG, [("Content-Type", "application/octet-stream")])

    def route_html(self, hit):
        self.send(200, b"<html></html>", [("Content-Type", "text/html; charset=utf-8")])

    def route_flaky(self, hit):  # 500 twice, then the image
        if hit <= 2:
            self.send(500, b"oops", [("Content-Type", "text/plain")])
        else:
            self.route_ok_png(hit)

    def route_429(self, hit):  # asks for a 1 s pause once, then the image
        if hit == 1:
            self.send(429, b"slow down", [("Retry-After", "1")])
        else:
            self.route_ok_png(hit)

    def route_stall(self, hit):  # headers, then nothing
        self.headers_then_stall([("Content-Type", "image/png"), ("Content-Length", str(len(PNG)))])

    def route_stall_headers(self, hit):  # accepts the connection and never answers
        self.server.stop.wait(STALL)
        self.close_connection = True

    def route_big(self, hit):
        self.headers_then_stall([("Content-Type", "image/png"), ("Content-Length", str(10 * MAX_BYTES))])

    def route_big_chunked(self, hit):  # more than the cap without a length, then a stall
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(4):
            c = b"x" * MAX_BYTES
            self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
        self.wfile.flush()
        self.server.stop.wait(STALL)
        self.close_connection = True

    def route_optout(self, hit):
        self.headers_then_stall([("Content-Type", "image/png"), ("X-Robots-Tag", "noai")])

    def route_optout_other(self, hit):
        self.send(200, PNG, [("Content-Type", "image/png"), ("X-Robots-Tag", "otherbot: noimageai")])

    def route_optout_multi(self, hit):
        self.send(200, PNG, [
            ("Content-Type", "image/png"),
            ("X-Robots-Tag", "otherbot: noai"),
            ("X-Robots-Tag", "noindex, nofollow"),
        ])

    def route_redirect(self, hit):
        self.send(302, b"", [("Location", "/ok.png")])

    def route_slow(self, hit):
        time.sleep(SLOW)
        self.route_ok_png(hit)


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _cfg(**overrides) -> DownloadConfig:
    return replace(DownloadConfig(timeout=TIMEOUT, retries=0, backoff=0.01, max_bytes=MAX_BYTES, concurrency=4),
                   **overrides)


def _reject(cfg: DownloadConfig, url: str) -> Rejected:
    with Downloader(cfg) as dl:
        with pytest.raises(Rejected) as info:
            dl.fetch(url)
    return info.value


# --------------------------------------------------------------------------------------------
# Bodies that are accepted


@pytest.mark.parametrize("path", ["/ok.png", "/nolength", "/octet", "/notype", "/redirect", "/optout-other"])
def test_accepted_routes_return_the_exact_image_bytes(base, path):
    with Downloader(_cfg()) as dl:
        assert dl.fetch(base + path) == PNG


def test_sends_our_user_agent(server, base):
    cfg = _cfg(user_agent="t2i-diffusion/9.9 (+test)")
    with Downloader(cfg) as dl:
        dl.fetch(base + "/ok.png")
    assert server.user_agents[-1] == "t2i-diffusion/9.9 (+test)"


def test_body_exactly_at_the_cap_is_kept(base):
    with Downloader(_cfg(max_bytes=len(PNG))) as dl:
        assert dl.fetch(base + "/nolength") == PNG


# --------------------------------------------------------------------------------------------
# Reject reasons


def test_404_is_http_error_without_retries(server, base):
    r = _reject(_cfg(retries=3), base + "/missing-once")
    assert (r.reason, r.detail) == ("http_error", "HTTP 404")
    assert server.hits["/missing-once"] == 1


def test_html_is_bad_content_type(base):
    assert _reject(_cfg(), base + "/html").reason == "bad_content_type"


def test_content_length_above_cap_is_rejected_without_reading(base):
    t0 = time.monotonic()
    assert _reject(_cfg(), base + "/big").reason == "byte_cap"  # reading would have timed out
    assert time.monotonic() - t0 < TIMEOUT


def test_stream_past_cap_is_aborted_early(base):
    assert _reject(_cfg(), base + "/big-chunked").reason == "byte_cap"


def test_noai_header_is_opt_out_before_the_body(base):
    assert _reject(_cfg(), base + "/optout").reason == "opt_out"


def test_second_x_robots_tag_header_counts(base):
    assert _reject(_cfg(), base + "/optout-multi").reason == "opt_out"


def test_empty_disallowed_list_disables_opt_out(base):
    with Downloader(_cfg(disallowed_header_directives=[])) as dl:
        assert dl.fetch(base + "/optout-multi") == PNG


# --------------------------------------------------------------------------------------------
# Retries


def test_flaky_server_succeeds_with_enough_retries(server, base):
    with Downloader(_cfg(retries=2)) as dl:
        assert dl.fetch(base + "/flaky/a") == PNG
    assert server.hits["/flaky/a"] == 3


def test_flaky_server_is_http_error_when_retries_run_out(server, base):
    r = _reject(_cfg(retries=1), base + "/flaky/b")
    assert (r.reason, r.detail) == ("http_error", "HTTP 500")
    assert server.hits["/flaky/b"] == 2


def test_429_is_retried_with_retry_after_capped_by_backoff(server, base):
    t0 = time.monotonic()
    with Downloader(_cfg(retries=1, backoff=0.05)) as dl:
        assert dl.fetch(base + "/429/a") == PNG
    # The server asked for 1 s; our schedule's longest step is 0.05 s.
    assert time.monotonic() - t0 < 0.8
    assert server.hits["/429/a"] == 2


def test_retry_delay_doubles_and_honours_retry_after_within_the_schedule():
    cfg = DownloadConfig(backoff=0.5, retries=3)  # schedule: 0.5, 1, 2
    assert [retry_delay(cfg, a) for a in range(3)] == [0.5, 1.0, 2.0]
    assert retry_delay(cfg, 0, retry_after=1.5) == 1.5  # honoured
    assert retry_delay(cfg, 0, retry_after=60) == 2.0  # capped at the longest step
    assert retry_delay(cfg, 2, retry_after=0) == 2.0  # never shorter than our own backoff
    assert retry_delay(DownloadConfig(backoff=10, retries=2), 0, retry_after=60) == 10  # MAX_RETRY_AFTER < backoff


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize("path", ["/stall/a", "/stall-headers/a"])
def test_stalled_server_ends_in_timeout_after_retries(server, base, path):
    cfg = _cfg(retries=1, backoff=0.05)
    t0 = time.monotonic()
    assert _reject(cfg, base + path).reason == "timeout"
    elapsed = time.monotonic() - t0
    assert (cfg.retries + 1) * TIMEOUT <= elapsed < (cfg.retries + 1) * TIMEOUT + cfg.backoff + 1.0
    assert server.hits[path] == 2


def test_refused_port_is_connection_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _reject(_cfg(retries=1), f"http://127.0.0.1:{port}/x.png").reason == "connection_error"


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "http://", "http:///path"])
def test_unusable_url_is_connection_error_at_once(url):
    t0 = time.monotonic()
    assert _reject(_cfg(retries=3, backoff=1.0), url).reason == "connection_error"
    assert time.monotonic() - t0 < 0.5  # a single retry would sleep 1 s


# --------------------------------------------------------------------------------------------
# fetch_many


def test_fetch_many_keeps_order_and_returns_rejections_in_place(base):
    urls = [base + "/ok.png", base + "/html", "ftp://x", base + "/missing-many", base + "/octet"]
    with Downloader(_cfg()) as dl:
        out = dl.fetch_many(urls)
    assert out[0] == PNG and out[4] == PNG
    assert [r.reason for r in out[1:4]] == ["bad_content_type", "connection_error", "http_error"]
    assert all(isinstance(r, Rejected) for r in out[1:4])


def test_fetch_many_runs_concurrently(base):
    n = 8
    urls = [f"{base}/slow/{i}" for i in range(n)]
    with Downloader(_cfg(concurrency=n, timeout=5.0)) as dl:
        t0 = time.monotonic()
        out = dl.fetch_many(urls)
        elapsed = time.monotonic() - t0
    assert out == [PNG] * n
    assert elapsed < n * SLOW / 2  # serial would take n * SLOW; generous for a loaded machine


def test_fetch_many_of_nothing_is_empty():
    with Downloader(_cfg()) as dl:
        assert dl.fetch_many([]) == []


# --------------------------------------------------------------------------------------------
# opted_out, directly

DISALLOWED = ["noai", "noimageai", "noindex", "noimageindex"]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], False),
        (["noai"], True),
        (["NoImageAI"], True),  # directives are case-insensitive
        (["nofollow, noarchive"], False),
        (["noarchive, noindex"], True),  # any directive of a comma list
        (["otherbot: noai"], False),  # scoped to another bot
        (["T2I-Diffusion: noai"], True),  # scoped to us, token case-insensitive
        (["otherbot: nofollow, noindex"], False),  # the scope covers the rest of the list
        (["otherbot: nofollow, t2i-diffusion: noai"], True),  # until the next scope
        (["otherbot: noai", "noindex, nofollow"], True),  # every header counts
        (["max-image-preview: large, unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        (["max-image-preview: large, noai"], True),  # a valued directive is not a bot name
    ],
)
def test_opted_out(values, expected):
    assert opted_out(values, DISALLOWED) is expected


def test_opted_out_with_empty_list_or_other_token():
    assert opted_out(["noai"], []) is False
    assert opted_out(["mybot: noai"], DISALLOWED, user_agent_token="mybot") is True
    assert opted_out(["t2i-diffusion: noai"], DISALLOWED, user_agent_token="mybot") is False
