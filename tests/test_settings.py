"""The web app's settings (pneumonia/web/settings.py): each comes from its PNEUMONIA_* variable with its
type, the config dict given to create_app wins over the environment, a value that cannot be used stops
create_app with the variable's name, and the Settings cannot be changed once made."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pneumonia.serving.classifier import SHIPPED_MODEL_DIR
from pneumonia.web import create_app
from pneumonia.web.settings import Settings, SettingsError, settings

# Every setting: the text of its environment variable, and the value that text must give (its type included).
FROM_TEXT = {
    "model_path": ("/srv/model", "/srv/model"),
    "runtime": ("KERAS", "keras"),
    "max_content_length": ("1048576", 1048576),
    "max_form_parts": ("0", 0),
    "batch_max_files": ("7", 7),
    "batch_chunk_size": ("2", 2),
    "batch_max_pixels": ("5000000", 5_000_000),
    "overlay_alpha": ("0.25", 0.25),
    "page_image_max_side": ("800", 800),
    "api_image_max_side": ("256", 256),
    "body_timeout": ("12.5", 12.5),
    "body_read_timeout": ("3", 3.0),
    "model_slots": ("1", 1),
    "model_queue_seconds": ("0", 0.0),
    "decoders": ("3", 3),
    "decode_memory_mib": ("256", 256),
    "decode_seconds": ("1.5", 1.5),
    "decode_queue_seconds": ("2", 2.0),
    "rate_limit_enabled": ("true", True),
    "rate_limit_uploads": ("5/minute;100/hour", "5/minute;100/hour"),
    "rate_limit_pages": ("60 per minute", "60 per minute"),
    "rate_limit_proxy_hops": ("1", 1),
    "access_keys": ("12345678901234567e3", "12345678901234567e3"),  # JSON would read a number
    "access_keys_file": ("/run/secrets/keys", "/run/secrets/keys"),
    "access_failures_limit": ("3 per minute", "3 per minute"),
    "static_transfers": ("1", 1),
    "monitor_window": ("50", 50),
    "monitor_min_images": ("20", 20),
}

REFUSED = [
    ("MODEL_SLOTS", "abc", "valid integer"),
    ("MODEL_SLOTS", "-1", "greater than or equal to 1"),
    ("BATCH_MAX_FILES", "0", "greater than or equal to 1"),
    ("BODY_TIMEOUT", "0", "greater than 0"),
    ("DECODE_SECONDS", "nan", "finite number"),
    ("OVERLAY_ALPHA", "1.5", "less than or equal to 1"),
    ("RATE_LIMIT_ENABLED", "maybe", "valid boolean"),
    ("RATE_LIMIT_UPLOADS", "lots", "couldn't parse rate limit string"),
    ("ACCESS_FAILURES_LIMIT", "1/minute;5/hour", "give one limit"),
    ("RUNTIME", "tpu", "choose one of onnx, keras"),
    ("MONITOR_MIN_IMAGES", "600", "at most MONITOR_WINDOW (500)"),
]


def test_every_setting_is_read_from_its_variable_with_its_type():
    assert set(FROM_TEXT) == set(Settings.model_fields)  # a new setting needs its line above
    loaded = Settings.load({}, {f"PNEUMONIA_{name.upper()}": text for name, (text, _) in FROM_TEXT.items()})
    for name, (_, expected) in FROM_TEXT.items():
        value = getattr(loaded, name)
        assert value == expected and type(value) is type(expected), name


def test_the_defaults_and_their_types():
    defaults = Settings.load({}, {})
    assert defaults == Settings()
    assert defaults.model_path == str(SHIPPED_MODEL_DIR) and defaults.runtime is None
    assert defaults.max_content_length == 20 * 1024 * 1024 and defaults.batch_max_files == 100
    assert defaults.model_slots == 2 and type(defaults.model_slots) is int
    assert defaults.body_timeout == 30.0 and type(defaults.body_timeout) is float
    assert defaults.rate_limit_enabled is False and defaults.access_keys is None
    assert defaults.monitor_min_images <= defaults.monitor_window


def test_the_config_dict_wins_over_the_environment_and_a_list_of_keys_is_kept_as_a_tuple():
    environ = {"PNEUMONIA_MODEL_SLOTS": "3", "PNEUMONIA_DECODERS": "4"}
    loaded = Settings.load({"MODEL_SLOTS": 1, "ACCESS_KEYS": ["a" * 16, "b" * 16]}, environ)
    assert loaded.model_slots == 1 and loaded.decoders == 4
    assert loaded.access_keys == ("a" * 16, "b" * 16)


def test_the_settings_cannot_be_changed():
    loaded = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        loaded.model_slots = 5
    with pytest.raises(ValidationError, match="Extra inputs"):
        Settings(model_slot=5)  # a misspelt name is refused, not ignored


def test_create_app_reads_the_environment_once_and_keeps_app_config_in_step(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_MONITOR_WINDOW", "50")
    monkeypatch.setenv("PNEUMONIA_MONITOR_MIN_IMAGES", "20")
    monkeypatch.setenv("PNEUMONIA_OVERLAY_ALPHA", "0.3")
    monkeypatch.setenv("PNEUMONIA_MODEL_SLOTS", "3")
    app = create_app({"MODEL_PATH": str(tmp_path), "TESTING": True, "MODEL_SLOTS": 1})  # no model there
    monkeypatch.setenv("PNEUMONIA_MONITOR_WINDOW", "60")  # after the start: not read
    loaded = settings(app)
    assert loaded.monitor_window == 50 and loaded.overlay_alpha == 0.3 and loaded.model_slots == 1
    assert app.config["OVERLAY_ALPHA"] == 0.3 and app.config["MODEL_SLOTS"] == 1 and app.testing
    assert all(app.config[name.upper()] == value for name, value in loaded)
    assert app.extensions["model_capacity"].slots == 1
    answer = app.test_client().get("/api/monitor").get_json()  # without a model: from the settings alone
    assert answer["window"] == 50 and answer["min_images"] == 20


@pytest.mark.parametrize("name, text, complaint", REFUSED, ids=[f"{name}={text}" for name, text, _ in REFUSED])
def test_a_value_that_cannot_be_used_stops_create_app_naming_the_variable(name, text, complaint, monkeypatch):
    monkeypatch.setenv(f"PNEUMONIA_{name}", text)
    with pytest.raises(SettingsError) as refused:
        create_app({"TESTING": True})
    assert f"PNEUMONIA_{name}={text!r}: " in str(refused.value) and complaint in str(refused.value)


def test_a_bad_value_in_the_config_dict_names_the_variable_and_the_key():
    with pytest.raises(SettingsError, match=r"PNEUMONIA_STATIC_TRANSFERS \(given to create_app as STATIC_TRANSFERS\)"):
        create_app({"TESTING": True, "STATIC_TRANSFERS": "many"})


def test_a_default_refused_for_another_settings_value_is_named_too():
    with pytest.raises(SettingsError, match=r"PNEUMONIA_MONITOR_MIN_IMAGES \(unset: its default\)=100: at most"):
        Settings.load({}, {"PNEUMONIA_MONITOR_WINDOW": "50"})


def test_every_setting_is_listed_in_the_docs():
    listed = (Path(__file__).parent.parent / "docs" / "web-app.md").read_text()
    missing = [name for name in Settings.model_fields if f"`PNEUMONIA_{name.upper()}`" not in listed]
    assert missing == []
