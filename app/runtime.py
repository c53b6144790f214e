"""Everything a process of the service needs, built once from ``Settings``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.blobs import BlobStore
from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    secret: bytes
    admin_key: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.db_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            blobs=BlobStore(settings.data_dir / "blobs"),
            secret=settings.secret_bytes(),
            admin_key=settings.admin_key_value(),
        )

    def close(self) -> None:
        self.engine.dispose()
