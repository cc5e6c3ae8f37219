"""The VAE registry and the client -> server upload boundary."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from federation.client import Client, ClientSetup
from federation.errors import ConfigError, UploadRejected
from federation.messages import FORMAT, PAYLOAD_KINDS, ClientReport, Payload, Uplink, load_uplink, write_message
from federation.privacy.spec import PrivacySpec
from federation.models import VAE, build_decoder, normalize_spec
from federation.training import TrainSettings

SPECS = [
    {"arch": "mlp", "latent_dim": 2, "hidden": [32, 16]},
    {"arch": "mlp", "latent_dim": 5, "hidden": [24]},
    {"arch": "conv", "latent_dim": 3, "channels": [4, 8], "fc": 16},
    {"arch": "conv"},
]
SMALL = {"arch": "mlp", "latent_dim": 2, "hidden": [32, 16]}


def _data(n=40, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class _Trained:
    """A trained client and the uplinks it would send (clones of its state)."""

    def __init__(self, client: Client):
        self.client, self.vae = client, client.vae

    def decoder_upload(self, rnd: int) -> Uplink:
        return Uplink(0, rnd, self.client.decoder_payload(), self.client.setup.num_samples, ClientReport())

    def full_upload(self, rnd: int) -> Uplink:
        return Uplink(0, rnd, self.client.vae_payload(), self.client.setup.num_samples, ClientReport())


def write_upload(up: Uplink, folder: Path) -> Path:
    return write_message(up, folder)


@pytest.fixture(scope="module")
def trained_client():
    """A client whose VAE has taken some optimizer steps (so its weights are not an initialization).
    Tests only read it: uploads hold clones of its state."""
    setup = ClientSetup(0, _data(), SMALL, TrainSettings(rounds=1, local_epochs=1, batch_size=16), 5, PrivacySpec())
    client = Client(setup, None, 0)
    client.train_round()
    return _Trained(client)


# --------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['arch']}-{s.get('latent_dim', 'default')}")
def test_registry_builds_vaes_with_image_shaped_decoders(spec):
    vae = VAE(spec)
    normal = normalize_spec(spec)
    assert vae.spec == normal and vae.latent_dim == normal["latent_dim"]
    x = _data(5)
    recon, mu, logvar = vae(x, torch.Generator().manual_seed(0))
    assert recon.shape == (5, 1, 28, 28)
    assert mu.shape == logvar.shape == (5, normal["latent_dim"])
    out = vae.decoder(torch.randn(7, normal["latent_dim"]))
    assert out.shape == (7, 1, 28, 28)
    assert float(out.detach().min()) >= 0.0 and float(out.detach().max()) <= 1.0  # sigmoid output: pixel intensities


def test_spec_defaults_are_filled_and_json_serializable():
    mlp = normalize_spec({})
    assert (mlp["arch"], mlp["latent_dim"], mlp["hidden"]) == ("mlp", 2, [512, 256, 128])
    conv = normalize_spec({"arch": "conv"})
    assert (conv["arch"], conv["latent_dim"], conv["channels"], conv["fc"]) == ("conv", 2, [32, 64], 256)
    for spec in (mlp, conv):
        assert json.loads(json.dumps(spec)) == spec
        assert normalize_spec(spec) == spec  # idempotent: the spec on the wire rebuilds the same model


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['arch']}-{s.get('latent_dim', 'default')}")
def test_build_decoder_from_spec_alone_reproduces_client_decoder(spec):
    torch.manual_seed(1)
    vae = VAE(spec)
    with torch.no_grad():  # make sure the weights are not whatever a fresh build would produce
        for p in vae.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    spec_on_the_wire = json.loads(json.dumps(vae.spec))
    torch.manual_seed(2)
    rebuilt = build_decoder(spec_on_the_wire)
    state = vae.decoder.state_dict()
    assert set(rebuilt.state_dict()) == set(state)
    assert any(not torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())  # differs before load
    rebuilt.load_state_dict(state, strict=True)
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, state[k]), k
    z = torch.randn(9, vae.latent_dim)
    vae.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(z), vae.decoder(z))


@pytest.mark.parametrize("spec,match", [
    ({"arch": "transformer"}, "unknown architecture 'transformer'"),
    ({"arch": "mlp", "latent_dim": 0}, "latent_dim must be a positive integer"),
    ({"arch": "mlp", "latent_dim": "two"}, "latent_dim must be a positive integer"),
    ({"arch": "mlp", "latent_dim": 2.0}, "latent_dim must be a positive integer"),
    ({"arch": "mlp", "latent_dim": True}, "latent_dim must be a positive integer"),
    ({"arch": "mlp", "hidden": []}, "hidden must be"),
    ({"arch": "mlp", "hidden": [64, -1]}, "hidden must be a positive integer"),
    ({"arch": "conv", "channels": [8]}, "channels must be 2"),
    ({"arch": "mlp", "channels": [8, 8]}, "unknown keys"),
    (["mlp"], "must be a mapping"),
])
def test_bad_specs_raise_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_decoder(spec)
    with pytest.raises(ConfigError, match=match):
        VAE(spec)


# ------------------------------------------------------------------------------------- uploads
def test_write_and_load_upload_round_trip(tmp_path, trained_client):
    up = trained_client.full_upload(rnd=3)
    up.payload.extras = {"stats": {"mean": torch.tensor([1.0, 2.0])}}
    path = write_upload(up, tmp_path / "round-3")
    assert path == tmp_path / "round-3" / "client-0.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["format"] == FORMAT and meta["kind"] == "vae" and meta["round"] == 3
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["bytes"] == path.stat().st_size
    assert meta["extra_artifacts"] == ["stats"]
    back = load_uplink(path)
    assert (back.client, back.round, back.kind, back.num_samples) == (0, 3, "vae", 40)
    assert back.spec == trained_client.vae.spec
    assert set(back.tensors) == set(up.tensors)
    for k, v in up.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert torch.equal(back.extras["stats"]["mean"], torch.tensor([1.0, 2.0]))
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temporaries


def test_alignfl_upload_holds_only_decoder_tensors(tmp_path, trained_client):
    up = trained_client.decoder_upload(rnd=0)
    spec = trained_client.vae.spec
    decoder_names = set(build_decoder(spec).state_dict())
    encoder_names = set(trained_client.vae.encoder.state_dict())
    assert up.kind == "decoder" and up.extras == {}
    assert set(up.tensors) == decoder_names
    assert not decoder_names & encoder_names
    path = write_upload(up, tmp_path)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys == {f"decoder.{k}" for k in decoder_names}
    assert not any(k.startswith("encoder") for k in keys)
    back = load_uplink(path)
    assert set(back.tensors) == decoder_names
    enc = list(trained_client.vae.encoder.state_dict().values())
    for name, t in back.tensors.items():
        assert torch.equal(t, trained_client.vae.decoder.state_dict()[name])
        assert not any(t.shape == e.shape and torch.equal(t, e) for e in enc), name


def _rewrite_sidecar(path: Path, **changes) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


def test_rejects_tensors_that_do_not_match_the_spec(tmp_path, trained_client):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    _rewrite_sidecar(path, spec={**trained_client.vae.spec, "latent_dim": 3})
    with pytest.raises(UploadRejected) as err:
        load_uplink(path)
    msg = str(err.value)
    assert "(16, 2)" in msg and "(16, 3)" in msg and "latent_dim=3" in msg, msg


def test_rejects_missing_and_undeclared_tensors(tmp_path, trained_client):
    up = trained_client.decoder_upload(0)
    first = sorted(up.tensors)[0]
    del up.tensors[first]
    with pytest.raises(UploadRejected, match="missing"):
        load_uplink(write_upload(up, tmp_path / "a"))
    # an encoder tensor smuggled into a decoder upload
    flat = trained_client.decoder_upload(0).payload.flat_tensors()
    flat["encoder.mu.weight"] = trained_client.vae.encoder.mu.weight.detach().clone()
    path = write_upload(trained_client.decoder_upload(0), tmp_path / "b")
    blob = st_save(flat)
    path.write_bytes(blob)
    _rewrite_sidecar(path, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    with pytest.raises(UploadRejected, match="undeclared tensors"):
        load_uplink(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_values(tmp_path, trained_client, bad):
    up = trained_client.decoder_upload(0)
    name = sorted(up.tensors)[-1]
    up.tensors[name] = up.tensors[name].clone()
    up.tensors[name].view(-1)[0] = bad
    with pytest.raises(UploadRejected, match=f"{name}.*non-finite"):
        load_uplink(write_upload(up, tmp_path))


def test_rejects_sha_mismatch(tmp_path, trained_client):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    tampered = trained_client.decoder_upload(0)
    name = sorted(tampered.tensors)[0]
    tampered.tensors[name] = tampered.tensors[name] + 1.0  # same size, different bytes
    blob = st_save(tampered.payload.flat_tensors())
    assert len(blob) == path.stat().st_size
    path.write_bytes(blob)
    with pytest.raises(UploadRejected, match="sha256"):
        load_uplink(path)


class _Marker:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this creates the marker file


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_rejects_pickle_without_unpickling(tmp_path, trained_client, writer):
    control = tmp_path / "control-marker"
    assert not control.exists()
    pickle.loads(pickle.dumps(_Marker(control)))  # the payload really does create the file
    assert control.exists()

    marker = tmp_path / "marker"
    path = write_upload(trained_client.decoder_upload(0), tmp_path / "shared")
    payload = {"decoder.0.weight": _Marker(marker)}
    if writer == "pickle":
        blob = pickle.dumps(payload)
    else:
        torch.save(payload, path)
        blob = path.read_bytes()
    path.write_bytes(blob)
    _rewrite_sidecar(path, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))  # passes the sha check
    with pytest.raises(UploadRejected, match="not a valid safetensors file"):
        load_uplink(path)
    assert not marker.exists()


def test_rejects_uploads_over_the_size_limit(tmp_path, trained_client):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    size = path.stat().st_size
    with pytest.raises(UploadRejected, match=f"{size} bytes exceeds the 1000-byte limit"):
        load_uplink(path, max_bytes=1000)
    assert load_uplink(path, max_bytes=size).client == 0  # the limit is inclusive


@pytest.mark.parametrize("change,match", [
    ({"format": "other/9"}, "sidecar"),
    ({"kind": "encoder"}, "kind 'encoder'"),
    ({"spec": {"arch": "nope"}}, "spec rejected"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": "12"}, "num_samples"),
    ({"client": "0"}, "client must be"),
])
def test_rejects_bad_sidecars(tmp_path, trained_client, change, match):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    _rewrite_sidecar(path, **change)
    with pytest.raises(UploadRejected, match=match):
        load_uplink(path)


@pytest.mark.parametrize("change", [{"round": None}, {"round": "x"}, {"extra_artifacts": 5},
                                    {"spec": {"arch": ["mlp"]}}], ids=["round-null", "round-text",
                                                                       "extras-int", "arch-list"])
def test_rejects_malformed_sidecar_fields(tmp_path, trained_client, change):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    _rewrite_sidecar(path, **change)
    with pytest.raises(UploadRejected):
        load_uplink(path)


def test_rejects_a_sidecar_naming_another_client(tmp_path, trained_client):
    """client-0's file must not be able to replace client 3's decoder on the server."""
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    _rewrite_sidecar(path, client=3)
    with pytest.raises(UploadRejected, match="says client 3 but the file is client-0"):
        load_uplink(path)


def test_rejects_missing_sidecar_and_missing_file(tmp_path, trained_client):
    path = write_upload(trained_client.decoder_upload(0), tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(UploadRejected, match="unreadable message"):
        load_uplink(path)
    with pytest.raises(UploadRejected, match="unreadable message"):
        load_uplink(tmp_path / "client-9.safetensors")


def test_vae_upload_cannot_pose_as_decoder(tmp_path, trained_client):
    path = write_upload(trained_client.full_upload(0), tmp_path)
    _rewrite_sidecar(path, kind="decoder")
    with pytest.raises(UploadRejected, match="undeclared tensors"):
        load_uplink(path)


def test_expected_tensors_match_modules():
    assert set(PAYLOAD_KINDS["decoder"](SMALL)) == set(build_decoder(SMALL).state_dict())
    assert set(PAYLOAD_KINDS["vae"](SMALL)) == set(VAE(SMALL).state_dict())
    assert any(k.startswith("encoder.") for k in PAYLOAD_KINDS["vae"](SMALL))
    assert PAYLOAD_KINDS["empty"] is None


def test_upload_flat_names_are_prefixed_by_kind():
    up = Payload("decoder", normalize_spec(SMALL), build_decoder(SMALL).state_dict(),
                 {"latent_gmm": {"weights": torch.ones(2)}})
    flat = up.flat_tensors()
    assert all(k.startswith("decoder.") or k.startswith("extra.latent_gmm.") for k in flat)
    assert "extra.latent_gmm.weights" in flat
