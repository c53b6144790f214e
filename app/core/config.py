"""Service settings: one ``Settings`` object read from ``FINDLADY_*`` environment variables.

Unset secrets are generated once and kept under ``DATA_DIR`` (file mode 0600) so that the
embedded default needs no setup; production deployments set ``FINDLADY_SECRET`` and
``FINDLADY_ADMIN_KEY`` explicitly and share them between the API and the workers.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Every knob of the service; environment variable ``FINDLADY_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FINDLADY_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="blobs, the SQLite file and generated secrets")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    broker_url: str | None = Field(None, description="Celery broker (Redis); default: in-process worker thread")
    queue_name: str = Field("findlady", description="Celery queue the API publishes to and workers consume")
    admin_key: SecretStr | None = Field(None, description="bearer key of the admin; generated if unset")
    secret: SecretStr | None = Field(None, description="HMAC secret for API keys and the audit chain")
    # sized for multi-GB models (a 7B model in bf16 is 14 GB); uploads are streamed to disk
    max_upload_bytes: int = Field(32 * GiB, gt=0, description="cap on one request body (413 above it)")
    job_max_attempts: int = Field(3, ge=1, description="attempts before a job is marked failed")
    job_soft_time_limit: int = Field(4 * 3600, gt=0, description="seconds; the job is asked to stop")
    job_hard_time_limit: int = Field(4 * 3600 + 300, gt=0, description="seconds; the worker process is killed")
    prepare_sync_bytes: int = Field(
        256 * MiB, ge=0, description="references up to this size get their null at registration; larger ones in the background")
    prepare_poll_seconds: float = Field(5.0, gt=0, description="how often a job waiting for a preparing reference looks again")
    lease_seconds: float = Field(60.0, gt=0, description="a running job's lease, renewed by a heartbeat")
    sweep_interval: float = Field(15.0, gt=0, description="seconds between sweeps for stranded jobs")
    requeue_after: float = Field(30.0, gt=0, description="a queued job never handed to the broker is re-sent after this")
    worker_threads: int = Field(1, ge=1, description="in-process workers (embedded default only)")
    signing_key: SecretStr | None = Field(None, description="Ed25519 seed (base64 of 32 bytes) that signs reports; "
                                          "generated into data_dir/signing.key if unset")
    signing_public_keys: str | None = Field(None, description="retired signing keys still published: comma-separated "
                                            "base64 of the 32 raw public-key bytes")
    drain_seconds: float = Field(0.0, ge=0, description="on shutdown, wait this long for running jobs before handing them back")
    device: str = Field("auto", description="torch device for verification: auto, cpu, cuda")
    test_job_delay: float = Field(0.0, ge=0, description="TEST ONLY: seconds a job sleeps before verifying")

    @field_validator("database_url", "broker_url", "admin_key", "secret", "signing_key", "signing_public_keys",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        # `FINDLADY_SECRET=` (empty) must not become an empty HMAC key.
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.job_hard_time_limit <= self.job_soft_time_limit:
            raise ValueError("FINDLADY_JOB_HARD_TIME_LIMIT must be above FINDLADY_JOB_SOFT_TIME_LIMIT")
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'findlady.db').resolve()}"

    @property
    def visibility_timeout(self) -> int:
        """Broker redelivery delay for unacknowledged tasks: above the longest job."""
        return int(self.job_hard_time_limit + 300)

    def secret_bytes(self) -> bytes:
        """The server secret; generated and stored as ``data_dir/secret.key`` when unset."""
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        return _file_secret(self.data_dir / "secret.key").encode()

    def admin_key_value(self) -> str:
        """The admin's bearer key; generated and stored as ``data_dir/admin.key`` when unset."""
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        return _file_secret(self.data_dir / "admin.key", prefix="fladmin_")


def _file_secret(path: Path, prefix: str = "") -> str:
    """Read a secret from ``path``, creating it (mode 0600) on first use.

    Written to a temporary file and hard-linked into place, so concurrent first starts agree
    on one value and nobody reads a half-written file.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(prefix + secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
