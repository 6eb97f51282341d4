"""The e2e tests reuse the real apprise receiver of the flow tests."""

from tests.flows.conftest import channels, receiver  # noqa: F401
