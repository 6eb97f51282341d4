"""Settings from the environment, read when asked for, never at import time.

pydantic-settings is imported when the settings are first asked for (~30 ms), so that a command
that needs only the protocol file (`nktrial calendar`, `escalation next`) starts without it."""

from __future__ import annotations

import functools
import os
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}  # host names of this machine in an API URL


@functools.cache
def settings_class():
    """The Settings model (built once, on first use)."""
    from pydantic import Field, field_validator
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Settings(BaseSettings):
        """NKTRIAL_* environment variables; defaults give the embedded SQLite setup under ./data."""

        model_config = SettingsConfigDict(env_prefix="NKTRIAL_", extra="ignore", frozen=True)  # shared (get_settings)
        data_dir: Path = Field(default=Path("data"), description="folder of the embedded SQLite trial database")
        database_url: str | None = Field(default=None, description="SQLAlchemy URL; PostgreSQL when set, else SQLite in data_dir")
        database_owner_url: str | None = Field(default=None, description="PostgreSQL URL of the owner role: migrations run with it; "
                                                                         "database_url is then the application role's")
        protocol_file: Path | None = Field(default=None, description="protocol YAML; the shipped NCT06641648 file when unset")
        apprise_config: Path | None = Field(default=None, description="apprise config file; each URL tagged with the roles it serves")
        reports_dir: Path | None = Field(default=None, description="folder daily rounds write report files and exports to; every "
                                         "node must see it (a shared mount when scaled out). Unset: <data_dir>/reports with the "
                                         "embedded database; with a shared database, none (the reports are artifacts)")
        actor: str | None = Field(default=None, description="staff ID the CLI writes as (or --as); no default: every write names its actor")
        delivery_lease_seconds: int = Field(default=300, ge=1, le=86_400, description="assumption: how long a delivery pass holds the notices "
                                            "it claimed; a pass that died is taken over after it (a batch of 10 sends well within it)")

        @field_validator("database_url", "database_owner_url", "protocol_file", "apprise_config", "actor", "reports_dir", mode="before")
        @classmethod
        def _empty_is_unset(cls, v):
            return None if isinstance(v, str) and not v.strip() else v

        @property
        def embedded_database(self) -> bool:
            """The trial database is a SQLite file on this machine (the one under data_dir, or one named)."""
            return self.trial_database_url.startswith("sqlite")

        @property
        def report_folder(self) -> Path | None:
            """Where report files go: reports_dir, else <data_dir>/reports beside an embedded database, else nowhere."""
            if self.reports_dir is not None:
                return self.reports_dir.resolve()
            return (self.data_dir / "reports").resolve() if self.embedded_database else None

        @property
        def trial_database_url(self) -> str:
            return self.database_url or f"sqlite:///{(self.data_dir / 'trial.db').resolve()}"

    return Settings


def get_settings():
    """NKTRIAL_* environment variables as they are now (a Settings instance). One instance is shared while those
    variables stay the same (named in any case, as pydantic-settings reads them): building one costs ~1 ms, and a
    rehearsal asked ~2,500 times. Nothing changes it."""
    return _settings_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.lower().startswith("nktrial_"))))


@functools.lru_cache(maxsize=16)
def _settings_for(nktrial_environment: tuple[tuple[str, str], ...]):
    """The settings built from the environment, which holds exactly these NKTRIAL_* variables (the cache key)."""
    return settings_class()()


def protocol_file_setting() -> Path | None:
    """get_settings().protocol_file without building the settings: NKTRIAL_PROTOCOL_FILE (its name in any case, as
    pydantic-settings matches it), empty meaning unset."""
    value = next((v for k, v in os.environ.items() if k.lower() == "nktrial_protocol_file"), None)
    return Path(value) if value is not None and value.strip() else None
