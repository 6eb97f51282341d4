"""Settings from the environment, read when asked for, never at import time."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """NKTRIAL_* environment variables; defaults give the embedded SQLite setup under ./data."""

    model_config = SettingsConfigDict(env_prefix="NKTRIAL_", extra="ignore")
    data_dir: Path = Field(default=Path("data"), description="folder of the embedded SQLite trial database")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; PostgreSQL when set, else SQLite in data_dir")
    protocol_file: Path | None = Field(default=None, description="protocol YAML; the shipped NCT06641648 file when unset")
    apprise_config: Path | None = Field(default=None, description="apprise config file; each URL tagged with the roles it serves")
    actor: str = Field(default="coordinator", description="who the CLI records writes as, in the audit trail")

    @field_validator("database_url", "protocol_file", "apprise_config", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def trial_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'trial.db').resolve()}"


def get_settings() -> Settings:
    return Settings()
