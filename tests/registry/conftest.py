from __future__ import annotations

import pytest

from appliance.keys import generate_keypair
from appliance.registry import create_app
from tests.conftest import make_token


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "registry.db"


@pytest.fixture
def app(db_path):
    return create_app({"DATABASE": str(db_path), "TESTING": False})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin(db_path, app):
    return {"Authorization": f"Bearer {make_token(db_path, 'admin')}"}


@pytest.fixture
def gateway(db_path, app):
    return {"Authorization": f"Bearer {make_token(db_path, 'gateway')}"}


def new_key() -> str:
    return generate_keypair()[1]


@pytest.fixture
def tenant(client, admin):
    assert client.post("/v1/tenants", json={"name": "acme"}, headers=admin).status_code == 201
    return "acme"
