"""Every registry test runs on both engines: SQLite (a file in tmp_path) and
PostgreSQL (a fresh database on one real server per session, see lab/postgres.py)."""

from __future__ import annotations

import os

import pytest

from appliance.keys import generate_keypair
from appliance.registry import create_app
from appliance.registry.store import open_store
from lab.postgres import PostgresServer
from tests.conftest import make_token

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_server():
    server = PostgresServer(durable=False).start()
    # Every store, CLI run and gunicorn worker of the session finds the password
    # where libpq looks by default: the PGPASSFILE path, as operators may use it.
    old = os.environ.get("PGPASSFILE")
    os.environ["PGPASSFILE"] = str(server.pgpass)
    yield server
    if old is None:
        os.environ.pop("PGPASSFILE", None)
    else:
        os.environ["PGPASSFILE"] = old
    server.stop()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def db(engine, tmp_path, request):
    """The --db value of a new, empty database on this test's engine."""
    if engine == "sqlite":
        yield str(tmp_path / "registry.db")
        return
    pg = request.getfixturevalue("pg_server")
    url = pg.create_database()
    yield url
    pg.drop_database(url)


@pytest.fixture
def store(db):
    s = open_store(db)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def app(db):
    app = create_app({"DATABASE": db, "TESTING": False})
    yield app
    app.extensions["wgjit_store"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin(db, app):
    return {"Authorization": f"Bearer {make_token(db, 'admin')}"}


@pytest.fixture
def gateway(db, app):
    return {"Authorization": f"Bearer {make_token(db, 'gateway')}"}


def new_key() -> str:
    return generate_keypair()[1]


@pytest.fixture
def tenant(client, admin):
    assert client.post("/v1/tenants", json={"name": "acme"}, headers=admin).status_code == 201
    return "acme"
