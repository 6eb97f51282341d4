"""The e2e tests use the session fixtures of tests/conftest.py: the Prefect server and the apprise receiver."""
