"""Configuration: defaults, TOML, MEDGE_* overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import json

import pytest

from edge.cli import main
from edge.config import DicomRoute, MedgeConfig, ModelConfig, load_config
from edge.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "medge.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_the_contracts() -> None:
    cfg = load_config(None, env={}, check_models=False)
    assert cfg.zmq.ingest == "tcp://127.0.0.1:5555"
    assert cfg.zmq.publish == "tcp://127.0.0.1:5556"
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9108)
    assert (cfg.dicom.host, cfg.dicom.port, cfg.dicom.ae_title) == ("127.0.0.1", 11112, "MEDGE")
    assert cfg.spool_dir == Path(".medge")
    assert cfg.engine_cache_dir == Path(".medge") / "engine-cache"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.zmq.ingest = "tcp://0.0.0.0:1"  # type: ignore[misc]


def test_no_config_serves_every_model_in_the_engines_dir(fixture_engines: Path) -> None:
    cfg = load_config(None, env={"MEDGE_ENGINES_DIR": str(fixture_engines)})
    assert cfg.model_names == ("tiny-det", "tiny-seg")
    assert cfg.default_model == "tiny-det"
    assert all(m.precision == "auto" and m.backend == "onnxruntime" for m in cfg.models)  # fast by default (issue 14)


def test_default_dicom_routes_follow_the_bundled_model_names(engines_copy: Path) -> None:
    (engines_copy / "tiny-seg").rename(engines_copy / "us-lesion-seg")
    text = (engines_copy / "us-lesion-seg" / "manifest.json").read_text()
    (engines_copy / "us-lesion-seg" / "manifest.json").write_text(text.replace('"tiny-seg"', '"us-lesion-seg"'))
    cfg = load_config(None, env={"MEDGE_ENGINES_DIR": str(engines_copy)})
    assert cfg.dicom.routes == (DicomRoute(modality="US", model="us-lesion-seg"),)


def test_full_toml_file(tmp_path: Path, fixture_engines: Path) -> None:
    path = _write(
        tmp_path,
        f"""
engines_dir = "{fixture_engines}"
spool_dir = "{tmp_path / 'spool'}"
[zmq]
ingest = "tcp://0.0.0.0:6000"
default_model = "tiny-seg"
[scheduler]
max_batch = 8
max_delay_us = 500
[[models]]
name = "tiny-seg"
precision = "int8"
threshold = 0.3
[dicom]
allowed_calling_aes = ["SCANNER1", "SCANNER2"]
unrouted = "reject"
[dicom.tls]
[[dicom.routes]]
modality = "US"
model = "tiny-seg"
body_part = "BREAST"
[[dicom.destinations]]
name = "pacs"
host = "10.0.0.5"
port = 104
ae_title = "PACS"
[outbox]
max_attempts = 3
""",
    )
    cfg = load_config(path, env={})
    assert cfg.zmq.ingest == "tcp://0.0.0.0:6000"
    assert cfg.model_names == ("tiny-seg",)
    assert cfg.model("tiny-seg").precision == "int8"
    assert cfg.scheduler.max_batch == 8 and cfg.scheduler.max_delay_us == 500
    assert cfg.dicom.allowed_calling_aes == ("SCANNER1", "SCANNER2")
    assert cfg.dicom.routes[0].body_part == "BREAST"
    assert cfg.dicom.destinations[0].port == 104
    assert cfg.outbox.max_attempts == 3
    assert cfg.spool_dir == tmp_path / "spool"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[metrics]\nport = 9200\n")
    env = {
        "MEDGE_METRICS__PORT": "9300",
        "MEDGE_ZMQ__INGEST": "tcp://0.0.0.0:7000",
        "MEDGE_DICOM__ALLOWED_CALLING_AES": "A1,B2",
        "MEDGE_DICOM__ENABLED": "false",
        "MEDGE_SPOOL_DIR": str(tmp_path / "s"),
        "MEDGE_SOMETHING_ELSE": "ignored: not a config key",
    }
    cfg = load_config(path, env=env, check_models=False)
    assert cfg.metrics.port == 9300
    assert cfg.zmq.ingest == "tcp://0.0.0.0:7000"
    assert cfg.dicom.allowed_calling_aes == ("A1", "B2")
    assert cfg.dicom.enabled is False
    assert cfg.spool_dir == tmp_path / "s"
    assert load_config(None, env={"MEDGE_DICOM__ALLOWED_CALLING_AES": '["X"]'}, check_models=False).dicom.allowed_calling_aes == ("X",)


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ("[zmq]\ningest = 5\n", {}, "zmq.ingest"),
        ("[zmq]\ningest = \"http://x\"\n", {}, "zmq.ingest"),
        ("[zmq]\nbogus = 1\n", {}, "zmq.bogus"),
        ("[metrics]\nport = 70000\n", {}, "metrics.port"),
        ("[scheduler]\nmax_batch = 0\n", {}, "scheduler.max_batch"),
        ("[[models]]\nname = \"x\"\nprecision = \"int4\"\n", {}, "models[0].precision"),
        ("[[models]]\nname = \"x\"\nbackend = \"magic\"\n", {}, "models[0].backend"),
        ("[[models]]\nprecision = \"fp32\"\n", {}, "name"),
        ("[[models]]\nname = \"x\"\nspin_us = -1\n", {}, "models[0].spin_us"),
        ("[dicom]\nunrouted = \"maybe\"\n", {}, "dicom.unrouted"),
        ("[dicom]\nae_title = \"A_TITLE_MUCH_TOO_LONG\"\n", {}, "dicom.ae_title"),
        ("[dicom]\nspool_max_mb = -1\n", {}, "dicom.spool_max_mb"),
        ("[dicom]\nspool_min_free_mb = -64\n", {}, "dicom.spool_min_free_mb"),
        ("[dicom]\nspool_max_mb = 0.5\n", {}, "dicom.spool_max_mb"),
        ("", {"MEDGE_DICOM__SPOOL_MIN_FREE_MB": "-1"}, "dicom.spool_min_free_mb"),
        ("[dicom.tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n", {}, "dicom.tls.cert"),
        ("[[dicom.destinations]]\nname = \"p\"\nhost = \"h\"\nport = 0\nae_title = \"P\"\n", {}, "dicom.destinations[0].port"),
        ("[outbox]\nretry_max_s = 0.1\n", {}, "outbox.retry_max_s"),
        ("", {"MEDGE_METRICS__PORT": "nine"}, "MEDGE_METRICS__PORT"),
        ("", {"MEDGE_ZMQ__NOPE": "1"}, "MEDGE_ZMQ__NOPE"),
        ("", {"MEDGE_MODELS": "x"}, "MEDGE_MODELS"),
        ("not toml = = =", {}, "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(_write(tmp_path, text), env=env, check_models=False)
    assert names in str(info.value)


def test_dicom_spool_limits_default_and_override() -> None:
    d = load_config(None, env={}, check_models=False).dicom
    assert (d.spool_min_free_mb, d.spool_max_mb) == (64, 0)  # 64 MiB reserve, no cap
    env = {"MEDGE_DICOM__SPOOL_MAX_MB": "2048", "MEDGE_DICOM__SPOOL_MIN_FREE_MB": "0"}
    d = load_config(None, env=env, check_models=False).dicom
    assert (d.spool_min_free_mb, d.spool_max_mb) == (0, 2048)


def test_models_are_checked_against_the_engines(tmp_path: Path, fixture_engines: Path) -> None:
    path = _write(tmp_path, f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "nope"\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.name.*nope"):
        load_config(path, env={})
    path = _write(
        tmp_path,
        f'engines_dir = "{fixture_engines}"\n[[dicom.routes]]\nmodality = "CT"\nmodel = "ct-liver"\n',
    )
    with pytest.raises(ConfigError, match=r"dicom\.routes\[0\]\.model"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="engines_dir"):
        load_config(None, env={"MEDGE_ENGINES_DIR": str(tmp_path / "empty")})


def test_model_lookup_and_dirs(fixture_engines: Path) -> None:
    cfg = MedgeConfig(engines_dir=fixture_engines, models=(ModelConfig(name="tiny-seg"),))
    assert cfg.model_dir(cfg.model("tiny-seg")) == fixture_engines / "tiny-seg"
    with pytest.raises(ConfigError, match="not served"):
        cfg.model("other")


def test_medge_serve_with_a_bad_config_stops_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "[zmq]\ningest = 42\n")
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "zmq.ingest" in err and "expected a string" in err


def test_every_key_is_documented() -> None:
    import typing

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")

    def keys(cls: type) -> list[str]:
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
            if dataclasses.is_dataclass(tp):
                out += keys(tp)
            elif inner is not None and dataclasses.is_dataclass(inner):
                out += keys(inner)
            else:
                out.append(f.name)
        return out

    missing = [k for k in keys(MedgeConfig) if f"| `{k}` |" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_spin_us_reaches_the_onnxruntime_session(tmp_path: Path, fixture_engines: Path) -> None:
    """[[models]] spin_us is what the served model's ONNX Runtime session spins (0: not at all)."""
    from edge.inference.model import ModelRegistry

    text = f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\nspin_us = 0\n[[models]]\nname = "tiny-det"\n'
    cfg = load_config(_write(tmp_path, text), env={})
    assert [m.spin_us for m in cfg.models] == [0, 1000]
    with ModelRegistry.from_config(cfg, warmup=False) as models:
        spins = {m.name: m.backend.spin_us for m in models}
    assert spins == {"tiny-seg": 0, "tiny-det": 1000}


def _tree_with_relative_files(root: Path, fixture_engines: Path) -> Path:
    """``root/`` holding a config's relative targets: engines, a model folder, TLS and key files."""
    import shutil

    shutil.copytree(fixture_engines, root / "engines")
    shutil.copytree(fixture_engines / "tiny-seg", root / "models" / "seg")
    for name in ("tls/http.pem", "tls/http.key", "tls/ca.pem", "tls/dicom.pem", "tls/dicom.key",
                 "tls/pacs-ca.pem", "keys/server.key_secret"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("placeholder\n")
    (root / "keys" / "clients").mkdir()
    return root


def test_relative_paths_in_a_file_resolve_against_its_folder(
    tmp_path: Path, fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _tree_with_relative_files(tmp_path / "etc" / "medge", fixture_engines)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon's working directory is not the config's folder
    cache = tmp_path / "abs-cache"
    path = _write(conf, f"""
engines_dir = "engines"
spool_dir = "spool"
cache_dir = "{cache}"
[zmq]
curve_server_key = "keys/server.key_secret"
curve_client_keys_dir = "keys/clients"
[metrics]
tls_cert = "tls/http.pem"
tls_key = "tls/http.key"
tls_client_ca = "./tls/ca.pem"
[[models]]
name = "tiny-seg"
path = "models/seg"
[[models]]
name = "tiny-det"
[dicom.tls]
cert = "tls/dicom.pem"
key = "tls/dicom.key"
[[dicom.destinations]]
name = "pacs"
host = "127.0.0.1"
port = 11113
ae_title = "PACS"
tls = true
tls_ca = "tls/pacs-ca.pem"
""")
    cfg = load_config(path, env={})
    assert cfg.engines_dir == conf / "engines" and cfg.spool_dir == conf / "spool"
    assert cfg.cache_dir == cache  # absolute: unchanged
    assert cfg.model_dir(cfg.model("tiny-seg")) == conf / "models" / "seg"
    assert cfg.model_dir(cfg.model("tiny-det")) == conf / "engines" / "tiny-det"
    assert (cfg.zmq.curve_server_key, cfg.zmq.curve_client_keys_dir) == (
        str(conf / "keys" / "server.key_secret"), str(conf / "keys" / "clients"))
    assert (cfg.metrics.tls_cert, cfg.metrics.tls_key, cfg.metrics.tls_client_ca) == (
        str(conf / "tls" / "http.pem"), str(conf / "tls" / "http.key"), str(conf / "tls" / "ca.pem"))
    assert (cfg.dicom.tls.cert, cfg.dicom.tls.key) == (str(conf / "tls" / "dicom.pem"), str(conf / "tls" / "dicom.key"))
    assert cfg.dicom.destinations[0].tls_ca == str(conf / "tls" / "pacs-ca.pem")
    assert cfg.dicom.destinations[0].tls_cert == ""  # unset stays unset
    # The same file named by a relative path gives the same result.
    assert load_config(Path("..") / "etc" / "medge" / "medge.toml", env={}) == cfg
    # Paths from the environment are the launcher's: relative to the working directory, as before.
    env_cfg = load_config(path, env={"MEDGE_SPOOL_DIR": "spool-from-env"})
    assert env_cfg.spool_dir == Path("spool-from-env")


def test_a_relative_path_found_only_from_the_working_directory_is_an_error(
    tmp_path: Path, fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old config that relied on the working directory fails naming both places, never serves silently."""
    work = _tree_with_relative_files(tmp_path / "work", fixture_engines)
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.chdir(work)
    path = _write(conf, f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\npath = "models/seg"\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.path") as exc:
        load_config(path, env={})
    assert str(conf / "models" / "seg") in str(exc.value) and str(work / "models" / "seg") in str(exc.value)
    path = _write(conf, 'spool_dir = "spool"\n')
    (work / "spool").mkdir()
    with pytest.raises(ConfigError, match="spool_dir"):
        load_config(path, env={}, check_models=False)
    # Absolute paths never change meaning.
    path = _write(conf, f'spool_dir = "{work / "spool"}"\n')
    assert load_config(path, env={}, check_models=False).spool_dir == work / "spool"


def test_duplicate_model_names_in_the_engines_dir_stop_serve_naming_both(
    engines_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    shutil.copytree(engines_copy / "tiny-seg", engines_copy / "tiny-seg-retrained")
    with pytest.raises(ConfigError, match="tiny-seg") as exc:
        load_config(None, env={"MEDGE_ENGINES_DIR": str(engines_copy)})
    assert str(engines_copy / "tiny-seg") in str(exc.value) and str(engines_copy / "tiny-seg-retrained") in str(exc.value)
    path = _write(tmp_path, f'engines_dir = "{engines_copy}"\n')
    assert main(["serve", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert str(engines_copy / "tiny-seg-retrained") in err and "unique" in err


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden", "", "x" * 65, "pacs 1", "pacs\n"])
def test_a_destination_name_that_is_not_a_plain_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    # The name becomes outbox/pending/<name> and outbox/dead-letter/<name>: "../../x" made both the
    # same folder outside the outbox, so a refused object was dead-lettered into its own queue.
    cfg = tmp_path / "medge.toml"
    cfg.write_text(
        "[[dicom.destinations]]\n"
        f"name = {json.dumps(name)}\nhost = \"127.0.0.1\"\nport = 11112\nae_title = \"PACS\"\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"dicom\.destinations\[0\]\.name"):
        load_config(cfg, env={}, check_models=False)


def test_default_stream_follows_the_wire_rule_for_stream_names(tmp_path: Path) -> None:
    cfg = tmp_path / "medge.toml"
    for bad in ("a\x85b", "a\u2028b", "a\x00b", ""):
        cfg.write_text(f"[zmq]\ndefault_stream = {json.dumps(bad)}\n", encoding="utf-8")  # JSON escapes are TOML's
        with pytest.raises(ConfigError, match=r"zmq\.default_stream"):
            load_config(cfg, env={}, check_models=False)
    cfg.write_text('[zmq]\ndefault_stream = "Sonde-\\u00e9"\n', encoding="utf-8")
    assert load_config(cfg, env={}, check_models=False).zmq.default_stream == "Sonde-\u00e9"
