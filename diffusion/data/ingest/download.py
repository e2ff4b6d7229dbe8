"""HTTP fetching for URL sources: one pooled client, bounded retries, and early rejection.

``Downloader.fetch(url)`` returns the body bytes or raises ``Rejected`` with one of the
download reasons from ``diffusion.data.ingest.core.REASONS``:

    http_error        non-2xx status (429 and 5xx only after retries), too many redirects
    timeout           connect, read or pool timeout, after retries
    connection_error  refused, reset, DNS, malformed or non-http(s) URL (the last two at once)
    opt_out           an X-Robots-Tag directive that applies to us is disallowed
    bad_content_type  Content-Type present and not image/* (octet-stream is allowed)
    byte_cap          more than max_bytes, by Content-Length or by counting the stream

Everything that can be decided from the headers (status, opt-out, type, length) is decided
before a single body byte is read, so a rejected URL costs one round trip.
"""

from __future__ import annotations

import email.utils
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx

from diffusion.config import DownloadConfig
from diffusion.data.ingest.core import Rejected

# Some servers label images as generic binary; img2dataset accepts these too.
OCTET_STREAM_TYPES = ("application/octet-stream", "binary/octet-stream")

# Retry-After is a server's wish, not an order: never let one response park a worker for long.
MAX_RETRY_AFTER = 5.0  # seconds

# X-Robots-Tag directives that carry a value after a colon ("max-image-preview: large").
# Their names must not be mistaken for a user-agent prefix ("otherbot: noai").
VALUED_DIRECTIVES = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")


class _Retry(Exception):
    """A transient failure: try again, or give up with ``rejected`` if no attempts are left."""

    def __init__(self, rejected: Rejected, retry_after: float | None = None):
        super().__init__(str(rejected))
        self.rejected = rejected
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said


# --------------------------------------------------------------------------------------------
# Pure helpers


def user_agent_token(user_agent: str) -> str:
    """The product token of a User-Agent: "t2i-diffusion/0.1 (+url)" -> "t2i-diffusion"."""
    product = user_agent.split("/", 1)[0].strip()
    return (product.split() or [""])[0].lower()


def opted_out(
    x_robots_tag_values: list[str],
    disallowed: list[str],
    user_agent_token: str = "t2i-diffusion",
) -> bool:
    """True if any X-Robots-Tag directive that applies to ``user_agent_token`` is disallowed.

    Each header value is a comma-separated list of directives. A "bot: " prefix scopes the
    directives after it (up to the next prefix) to that bot, as in Google's X-Robots-Tag spec:
    "otherbot: noai, noindex" is about otherbot only; "noai" is about everyone. An empty
    ``disallowed`` list disables the check.
    """
    banned = {d.strip().lower() for d in disallowed}
    if not banned:
        return False
    ours = user_agent_token.strip().lower()
    for value in x_robots_tag_values:
        scope = None  # None: applies to every bot
        for part in value.split(","):
            head, colon, rest = part.partition(":")
            head = head.strip().lower()
            if colon and head and not any(c.isspace() for c in head) and head not in VALUED_DIRECTIVES:
                scope, part = head, rest  # "bot: directive" starts a new scope
            directive = part.partition(":")[0].strip().lower()  # drop a value ("max-snippet: 20")
            if directive in banned and scope in (None, ours):
                return True
    return False


def retry_delay(cfg: DownloadConfig, attempt: int, retry_after: float | None = None) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based): backoff * 2**attempt.

    A server's Retry-After may lengthen the wait, but never beyond the longest step of our own
    backoff schedule nor beyond MAX_RETRY_AFTER: a worker should not idle for minutes on one URL.
    """
    delay = cfg.backoff * 2**attempt
    if retry_after is not None:
        longest = cfg.backoff * 2 ** max(cfg.retries - 1, 0)
        delay = max(delay, min(retry_after, longest, MAX_RETRY_AFTER))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now; it is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def _check_url(url: str) -> None:
    """Reject URLs that no retry can fix (malformed, no host, not http/https) before any I/O."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise Rejected("connection_error", f"invalid URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise Rejected("connection_error", f"unsupported URL {url!r}")
    if not parsed.host:
        raise Rejected("connection_error", f"URL without a host {url!r}")


# --------------------------------------------------------------------------------------------
# Downloader


class Downloader:
    """Fetch image URLs with one pooled ``httpx.Client``; safe to share between threads.

    Use as a context manager so the pooled connections are closed::

        with Downloader(cfg) as dl:
            results = dl.fetch_many(urls)   # bytes or Rejected, in input order
    """

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.token = user_agent_token(cfg.user_agent)
        # One connection per worker thread; keeping them all alive lets a host's URLs reuse them.
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self._client = httpx.Client(
            follow_redirects=True,
            timeout=httpx.Timeout(cfg.timeout),  # connect, read, write and pool, each
            headers={"User-Agent": cfg.user_agent},
            limits=limits,
        )

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str) -> bytes:
        """The body of ``url``; raises Rejected. Transient failures are retried with backoff."""
        _check_url(url)
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._attempt(url)
            except _Retry as e:
                if attempt == self.cfg.retries:
                    raise e.rejected from None
                time.sleep(retry_delay(self.cfg, attempt, e.retry_after))
        raise AssertionError("unreachable")  # the loop returns or raises

    def fetch_many(self, urls: list[str]) -> list[bytes | Rejected]:
        """Fetch ``urls`` on cfg.concurrency threads; per-URL failures come back as Rejected."""
        if not urls:
            return []
        workers = max(1, min(self.cfg.concurrency, len(urls)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            return list(pool.map(self._fetch_or_reject, urls))

    # ----------------------------------------------------------------------------------------

    def _fetch_or_reject(self, url: str) -> bytes | Rejected:
        try:
            return self.fetch(url)
        except Rejected as r:
            return r

    def _attempt(self, url: str) -> bytes:
        """One GET. Raises Rejected (final), or _Retry for timeouts, resets and 429/5xx."""
        try:
            with self._client.stream("GET", url) as response:
                self._check_status(response)
                self._check_headers(response)
                return self._read_capped(response)
        except httpx.TimeoutException as e:  # connect, read, write or pool
            raise _Retry(Rejected("timeout", f"{type(e).__name__} for {url}")) from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise _Retry(Rejected("connection_error", f"{type(e).__name__}: {e}")) from None
        except httpx.TooManyRedirects as e:
            raise Rejected("http_error", str(e)) from None
        except (httpx.TransportError, httpx.DecodingError, httpx.InvalidURL) as e:
            # e.g. a redirect to ftp:// or to a malformed Location: retrying cannot help
            raise Rejected("connection_error", f"{type(e).__name__}: {e}") from None

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if response.is_success:
            return
        rejected = Rejected("http_error", f"HTTP {status}")
        if status == 429 or status >= 500:
            raise _Retry(rejected, parse_retry_after(response.headers.get("Retry-After")))
        raise rejected

    def _check_headers(self, response: httpx.Response) -> None:
        headers = response.headers
        tags = headers.get_list("X-Robots-Tag")
        if tags and opted_out(tags, self.cfg.disallowed_header_directives, self.token):
            raise Rejected("opt_out", "; ".join(tags))

        # An empty Content-Type says as little as a missing one, so both are let through.
        media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type and not media_type.startswith("image/") and media_type not in OCTET_STREAM_TYPES:
            raise Rejected("bad_content_type", media_type)

        length = headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.cfg.max_bytes:
            raise Rejected("byte_cap", f"Content-Length {length} > {self.cfg.max_bytes}")

    def _read_capped(self, response: httpx.Response) -> bytes:
        # Count what actually arrives: Content-Length may be missing or wrong, and a compressed
        # body can inflate far beyond it. Stop at the first chunk past the cap. No chunk_size:
        # with one, httpx waits to fill a whole chunk, so a stall after the cap was crossed
        # would end in a timeout instead of byte_cap.
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.cfg.max_bytes:
                raise Rejected("byte_cap", f"more than {self.cfg.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
