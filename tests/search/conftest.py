"""Fixtures of the search tests."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import IN_CI


@pytest.fixture
def postgres_stores():
    """URLs of two fresh databases on the local PostgreSQL, for Optuna and for MLflow (both keep an
    alembic_version table, so they cannot share one, as in docker-compose.yml), dropped afterwards. Skips where there
    is no PostgreSQL, except in CI, where it must be there."""
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except Exception as exc:
        if IN_CI:
            raise AssertionError(f"PostgreSQL is required in CI: {exc}") from exc
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({exc}); this test is required in CI")
    conn.autocommit = True
    names = [f"mps_test_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"CREATE DATABASE {name}")
        yield tuple(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}" for name in names)
    finally:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()
