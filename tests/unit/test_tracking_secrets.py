"""No URI password and no secret environment value reaches MLflow or a message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.unit.test_tracking import make_tracker
from xp.tracking import (
    flatten_params,
    is_secret_name,
    redact_environ,
    redact_secrets,
    redact_uri,
)

TOKEN = "tok-7c1e9b2d"
PASSWORD = "pw-s3cret-9f1"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pass@host:5000", "http://user:***@host:5000"),
        ("https://user:p%40ss@host/mlflow/", "https://user:***@host/mlflow/"),
        ("http://user:p@ss@host/x", "http://user:***@host/x"),  # an unencoded "@"
        ("http://user:pa/ss@host/x", "http://user:***@host/x"),  # an unencoded "/"
        ("https://token@host", "https://***@host"),
        (
            "postgresql://mlflow:pw@db:5432/mlflow?sslmode=require&password=pw",
            "postgresql://mlflow:***@db:5432/mlflow?sslmode=require&password=***",
        ),
        (
            "error: API request to http://u:pw@127.0.0.1:5000/api/2.0/x failed",
            "error: API request to http://u:***@127.0.0.1:5000/api/2.0/x failed",
        ),
        ("tracking_uri='http://a:b@h'", "tracking_uri='http://a:***@h'"),
        ("http://host:5000/path@x", "http://host:5000/path@x"),  # no credentials
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
        ("no URL here: user:pass@host", "no URL here: user:pass@host"),
    ],
)
def test_redact_uri(text: str, shown: str) -> None:
    assert redact_uri(text) == shown
    assert redact_uri(shown) == shown  # idempotent


def test_secret_names_and_environments() -> None:
    secret = ["MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "api_key", "PASSWD"]
    assert all(is_secret_name(name) for name in secret)
    assert not any(is_secret_name(name) for name in ["HOME", "MLFLOW_TRACKING_URI", "PATH"])
    environ = {
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "MLFLOW_TRACKING_URI": f"http://xp:{PASSWORD}@host",
        "HOME": "/home/xp",
    }
    assert redact_environ(environ) == {
        "MLFLOW_TRACKING_PASSWORD": "***",
        "MLFLOW_TRACKING_URI": "http://xp:***@host",
        "HOME": "/home/xp",
    }
    text = f"token {TOKEN}, password {PASSWORD}, 1 key"
    assert redact_secrets(text, {"HF_TOKEN": TOKEN, "DB_PASSWORD": PASSWORD, "KEYS": "1"}) == (
        "token ***, password ***, 1 key"  # values shorter than 4 characters are left
    )


def test_no_secret_reaches_params_tags_or_the_error(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's config that interpolates a token from the environment, and a URI with a
    # password typed on the command line: both end up in params, tags and errors.
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    uri_with_password = f"http://xp:{PASSWORD}@mlflow.example:5000"
    config = {
        "tracking": {"tracking_uri": uri_with_password},
        "data": {"headers": f"Authorization: Bearer {TOKEN}"},
    }
    log = logging.getLogger("tests.tracking")
    tracker = make_tracker(
        mlflow_uri,
        tmp_path,
        log,
        params=flatten_params(config),
        tags={"xp.overrides": f"tracking.tracking_uri={uri_with_password}"},
    )
    tracker.start()
    tracker.set_tags({"xp.note": f"token={TOKEN}"})
    tracker.close("FAILED", error=f"ConnectionError: {uri_with_password} refused {TOKEN}")

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    error_txt = Path(client.download_artifacts(tracker.run_id, "error.txt", str(tmp_path / "dl")))
    recorded = [*run.data.params.values(), *run.data.tags.values(), error_txt.read_text()]
    assert not [text for text in recorded if PASSWORD in text or TOKEN in text]
    assert run.data.params["tracking.tracking_uri"] == "http://xp:***@mlflow.example:5000"
    assert run.data.params["data.headers"] == "Authorization: Bearer ***"
    assert (
        run.data.tags["xp.overrides"] == "tracking.tracking_uri=http://xp:***@mlflow.example:5000"
    )
    assert (
        run.data.tags["xp.error"]
        == "ConnectionError: http://xp:***@mlflow.example:5000 refused ***"
    )


def test_a_saved_config_holding_a_secret_stays_yaml_that_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `key: ***` is a YAML alias, which no loader takes: resume= and test= of such a run
    # failed with a ScannerError. The secret becomes the string '***'.
    import yaml
    from omegaconf import OmegaConf

    from xp.build import redacted_yaml

    monkeypatch.setenv("XP_DATA_API_KEY", TOKEN)
    cfg = OmegaConf.create(
        {
            "data": {"key": "${oc.env:XP_DATA_API_KEY}", "url": f"https://h/?k={TOKEN}"},
            "keys": ["${oc.env:XP_DATA_API_KEY}", "plain"],
            "lr": 0.001,
        }
    )
    text = redacted_yaml(cfg)
    assert TOKEN not in text
    assert yaml.safe_load(text) == {
        "data": {"key": "***", "url": "https://h/?k=***"},
        "keys": ["***", "plain"],
        "lr": 0.001,
    }
    assert cfg.data.key == TOKEN  # the run's own config keeps its value
    plain = OmegaConf.create({"lr": 0.001, "name": "x"})
    assert redacted_yaml(plain) == OmegaConf.to_yaml(plain)  # nothing secret: as before
