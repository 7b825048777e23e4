"""The driver's storage and hub credentials, for the processes Ray starts on other nodes.

Endpoints and regions travel in the tasks' `runtime_env`. Keys and tokens never do: Ray's
state API and dashboard show every task's and actor's `runtime_env` to anyone who reaches
them. They go into one Ray object, put by the driver, which a task reads into its own
environment before it makes any client. Where the driver has none, nothing is forwarded
and the nodes use their own (instance or workload identity, their own environment).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

from raysft.storage.files import is_remote

# Read by pyarrow, boto, gcsfs and huggingface_hub from the environment of the process.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
SETTINGS_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "HF_ENDPOINT", "HF_HUB_OFFLINE",
)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """`settings`: variables safe to show; `secrets`: a Ray object holding the others."""

    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    secrets: Any = None  # ray.ObjectRef of a dict[str, str]

    @classmethod
    def of_driver(cls) -> "Credentials":
        """This process's credentials, the secret ones put into the object store (Ray is
        connected)."""
        import ray

        settings = {name: os.environ[name] for name in SETTINGS_ENV if name in os.environ}
        secrets = {name: os.environ[name] for name in SECRET_ENV if name in os.environ}
        return cls(settings, ray.put(secrets) if secrets else None)

    @classmethod
    def for_paths(cls, paths: list[str]) -> "Credentials":
        """The driver's credentials where any of `paths` is remote, else none."""
        return cls.of_driver() if any(is_remote(p) for p in paths) else cls()

    def runtime_env(self, env: dict[str, str] | None = None) -> dict | None:
        """A `runtime_env` with the settings (and `env`); never a secret."""
        variables = {**self.settings, **(env or {})}
        return {"env_vars": variables} if variables else None

    def apply(self) -> None:
        """Put the secrets into this process's environment (in a task, before any client)."""
        if self.secrets is not None:
            import ray

            os.environ.update(ray.get(self.secrets))

    def around(self, fn: Callable) -> Callable:
        """`fn`, applying the credentials first wherever it runs."""
        if self.secrets is None:
            return fn

        @functools.wraps(fn)
        def with_credentials(*args, **kwargs):
            self.apply()
            return fn(*args, **kwargs)

        return with_credentials


NONE = Credentials()
