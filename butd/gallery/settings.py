"""Everything the gallery can be configured with, in one frozen dataclass (``tools/gallery.py`` fills it in)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from butd.errors import ConfigError

DAY_S = 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class ThrottlePolicy:
    """How repeated failed logins are slowed down, per user name and per client address.

    The first ``free_failures_*`` failures cost nothing; each later one blocks that key for ``first_delay_s``, then
    twice as long, and so on up to ``max_delay_s``. Failures are forgotten ``forget_after_s`` after the last attempt.
    """

    free_failures_per_user: int = 5
    free_failures_per_address: int = 20
    first_delay_s: float = 1.0
    max_delay_s: float = 900.0
    forget_after_s: float = 900.0

    def delay_s(self, failures: int, free: int) -> float:
        """Seconds a key with ``failures`` recorded failures stays blocked after its last attempt."""
        if failures <= free:
            return 0.0
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** min(failures - free - 1, 40))


@dataclass(frozen=True, kw_only=True)
class GallerySettings:
    """The gallery's configuration.

    ``database_url`` is an SQLAlchemy URL (``sqlite:///PATH`` or ``postgresql+psycopg://...``); images and
    thumbnails live under ``data_dir``. Upload limits are those of the model service; ``quota_bytes`` bounds what
    one user stores (images plus thumbnails). ``clock`` (seconds since the epoch) is injectable for tests.
    """

    database_url: str
    data_dir: Path
    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_images: int = 16
    quota_bytes: int = 500_000_000
    default_beam_size: int = 3
    thumbnail_size: int = 320
    page_size: int = 24
    max_page_size: int = 100
    session_ttl_s: float = 14 * DAY_S
    secure_cookies: bool = False
    password_min_length: int = 8
    password_max_length: int = 1024
    # argon2id cost: the defaults are argon2-cffi's (RFC 9106 low-memory profile); tests lower them.
    password_time_cost: int = 3
    password_memory_kib: int = 65_536
    password_parallelism: int = 4
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        positive = {
            "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels, "max_images": self.max_images,
            "quota_bytes": self.quota_bytes, "thumbnail_size": self.thumbnail_size, "page_size": self.page_size,
            "session_ttl_s": self.session_ttl_s, "password_min_length": self.password_min_length,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"gallery settings: {name} must be > 0, got {value}")
        if not 1 <= self.default_beam_size <= 10:
            raise ConfigError(f"gallery settings: default_beam_size must be in 1..10, got {self.default_beam_size}")
        if self.page_size > self.max_page_size:
            raise ConfigError(f"gallery settings: page_size {self.page_size} exceeds max_page_size "
                              f"{self.max_page_size}")

    @property
    def cookie_name(self) -> str:
        # The __Host- prefix makes browsers insist on Secure, Path=/ and no Domain: no subdomain can plant it.
        return "__Host-butd_session" if self.secure_cookies else "butd_session"
