"""Whole runs: the quickstart through the CLI, and tiny in-process runs of every strategy."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from alignfl_audit.config import from_dict, load_config
from alignfl_audit.orchestrate import run_experiment
from conftest import PROJECT_ROOT, tiny_config
from federation.errors import ConfigError
from federation.messages import load_downlink, load_uplink

UTILITY_KEYS = {"probe_accuracy", "probe_f1", "fid", "tstr_accuracy"}
# every shipped run config; sweep files (a list of runs over a base config) are checked by their own tests
EXPERIMENT_CONFIGS = sorted(p.name for p in (PROJECT_ROOT / "configs").glob("*.yaml")
                            if "runs" not in yaml.safe_load(p.read_text()))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny in-process training runs faster with one torch thread on a busy machine."""


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_shipped_configs_validate_and_audit_and_report_by_default(path):
    """Every shipped experiment config loads; those whose strategy shares decoders audit them and write
    the report in the one ``alignfl-audit run`` call; the centralized reference shares nothing."""
    cfg = load_config(PROJECT_ROOT / "configs" / path)
    assert cfg.report is True
    assert cfg.audit.enabled is cfg.strategy_class.federated()


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_shipped_configs_insert_canaries_whose_bound_can_be_positive(path):
    """Canaries are on in every shipped config, and enough of them that the one-run bound could exceed 1."""
    from attacks.empirical_epsilon import one_run_ceiling
    from alignfl_audit.config import canary_guesses

    cfg = load_config(PROJECT_ROOT / "configs" / path)
    m = cfg.partition.canaries.count
    assert m >= 2
    assert one_run_ceiling(m, canary_guesses(m, cfg.audit), cfg.privacy.delta, cfg.audit.alpha) > 1.0


def test_shipped_sweep_base_inserts_canaries():
    sweep = yaml.safe_load((PROJECT_ROOT / "configs" / "sweep-dp-vs-lcd.yaml").read_text())
    assert load_config(PROJECT_ROOT / "configs" / sweep["base"]).partition.canaries.count >= 2


def test_positive_control_twin_differs_only_in_privacy():
    """configs/positive-control-dpsgd.yaml is configs/positive-control.yaml with DP-SGD: same data, model,
    training, canaries and audit; only the name and the privacy section differ."""
    plain = load_config(PROJECT_ROOT / "configs" / "positive-control.yaml").to_dict()
    dp = load_config(PROJECT_ROOT / "configs" / "positive-control-dpsgd.yaml").to_dict()
    assert plain["privacy"]["mechanism"] == "none"
    assert dp["privacy"]["mechanism"] == "dp-sgd" and dp["privacy"]["target_epsilon"] > 0
    assert {k for k in plain if plain[k] != dp[k]} == {"name", "privacy"}
    assert plain["data"]["allow_embedded"] is True and plain["partition"]["canaries"]["count"] >= 2


def test_canaries_that_can_prove_nothing_are_refused():
    with pytest.raises(ConfigError) as err:  # 10 canaries at 0.2: 4 guesses, and 0.5^4 > 0.05
        from_dict(tiny_config(partition={"canaries": {"count": 10, "client": 0}}))
    assert "can never exceed 0" in str(err.value) and "\n" not in str(err.value)
    from_dict(tiny_config(partition={"canaries": {"count": 10, "client": 0}}, audit={"canary_guesses": 0.5}))


# ------------------------------------------------------------------------------------ quickstart
def test_quickstart_runs_end_to_end(quickstart_run):
    """`alignfl-audit run configs/quickstart.yaml --out TMP --quiet` (started in the background by
    conftest.py so that it overlaps the rest of the suite)."""
    proc, out = quickstart_run, quickstart_run.out
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stdout and "probe_accuracy=" in proc.stdout
    cfg = load_config(PROJECT_ROOT / "configs" / "quickstart.yaml")
    rounds, n_clients = cfg.training.rounds, cfg.partition.n_clients

    for name in ("config.resolved.yaml", "partition.json", "status.json", "metrics.json", "rounds.csv",
                 "audit.json", "report.html", "report.metrics.csv", "run.log"):
        assert (out / name).is_file(), name  # the main job trains, audits and reports in one call
    audit = json.loads((out / "audit.json").read_text())
    assert set(audit["lipschitz"]) == {str(k) for k in range(cfg.partition.n_clients)}
    assert audit["outliers"]["groups"]["outliers"]["n"] == cfg.partition.outliers.count
    assert "best AUC" in proc.stdout and f"report: {out / 'report.html'}" in proc.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    resolved = load_config(out / "config.resolved.yaml")
    assert resolved.to_dict() == cfg.to_dict()  # the resolved config reloads to the same experiment

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "alignfl" and metrics["seed"] == 0
    u = metrics["utility"]
    assert UTILITY_KEYS <= set(u)
    assert 0.2 < u["probe_accuracy"] <= 1.0, u  # above chance for 10 balanced classes
    assert 0.0 < u["probe_f1"] <= 1.0
    assert u["fid"] > 0 and u["fid"] == u["fid"]
    assert 0.0 <= u["tstr_accuracy"] <= 1.0
    assert metrics["shared_artifacts"] == ["decoder", "decoder_spec"]
    assert metrics["rejected_uploads"] == []

    rows = _rows(out / "rounds.csv")
    assert [int(r["round"]) for r in rows] == list(range(rounds))
    assert float(rows[-1]["probe_accuracy"]) == pytest.approx(u["probe_accuracy"])

    partition = json.loads((out / "partition.json").read_text())
    assert [c["classes"] for c in partition["clients"]] == cfg.partition.client_classes
    assert len(partition["outliers"]["ids"]) == cfg.partition.outliers.count

    for r in range(rounds):
        files = sorted(p.name for p in (out / "shared" / f"round-{r}").iterdir())
        assert files == sorted([f"client-{k}.safetensors" for k in range(n_clients)]
                               + [f"client-{k}.json" for k in range(n_clients)]
                               + ["server-to-clients.safetensors", "server-to-clients.json"])
        down = load_downlink(out / "shared" / f"round-{r}" / "server-to-clients.safetensors")
        assert down.recipients == tuple(range(n_clients)) and down.payload.kind == "empty"  # ALIGN-FL sends nothing
        for k in range(n_clients):
            up = load_uplink(out / "shared" / f"round-{r}" / f"client-{k}.safetensors")
            assert (up.client, up.round, up.kind) == (k, r, "decoder")
    assert not (out / "shared" / f"round-{rounds}").exists()

    figures = out / "figures"
    for name in ["samples-global.png", "latent-scatter.png"] + [f"samples-client-{k}.png" for k in range(n_clients)]:
        assert _is_png(figures / name), name


# ----------------------------------------------------------------------------- tiny in-process
def _run(tmp_path: Path, label: str, **overrides):
    run = run_experiment(from_dict(tiny_config(**overrides)), out=tmp_path / label, quiet=True)
    assert run.is_complete()
    return run, run.read_json("metrics.json")


@pytest.fixture(scope="module")
def alignfl_seed0(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("alignfl"), "seed0")


def test_same_seed_same_results_different_seed_different_results(alignfl_seed0, tmp_path):
    run_a, a = alignfl_seed0
    run_b, b = _run(tmp_path, "seed0-again")
    assert a["utility"] == b["utility"]
    assert (run_a.path / "rounds.csv").read_bytes() == (run_b.path / "rounds.csv").read_bytes()
    assert (run_a.path / "partition.json").read_bytes() == (run_b.path / "partition.json").read_bytes()
    uploads = sorted((run_a.path / "shared" / "round-0").glob("*.safetensors"))
    assert len(uploads) == 4  # three uplinks, one downlink
    for f in uploads:
        assert f.read_bytes() == (run_b.path / "shared" / "round-0" / f.name).read_bytes()

    run_c, c = _run(tmp_path, "seed1", seed=1)
    assert c["seed"] == 1
    assert c["utility"]["fid"] != a["utility"]["fid"]  # continuous; the tiny probe may tie by chance
    assert c["utility"] != a["utility"]
    assert (run_c.path / "rounds.csv").read_bytes() != (run_a.path / "rounds.csv").read_bytes()
    assert (run_c.path / "partition.json").read_bytes() != (run_a.path / "partition.json").read_bytes()


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "centralized"])
def test_every_strategy_writes_the_same_metric_keys(alignfl_seed0, tmp_path, strategy):
    _, ref = alignfl_seed0
    own = {"fedavg": {}, "fedprox": {"mu": 0.5}, "centralized": {"epochs": 1}}[strategy]
    run, m = _run(tmp_path, strategy, strategy={"name": strategy, **own})
    assert m["strategy"] == strategy
    assert set(m) == set(ref)
    assert set(m["utility"]) == set(ref["utility"]) and UTILITY_KEYS <= set(m["utility"])
    assert 0.0 <= m["utility"]["probe_accuracy"] <= 1.0 and m["utility"]["fid"] > 0
    assert len(_rows(run.path / "rounds.csv")) == 1
    uploads = sorted((run.path / "shared").rglob("*.safetensors"))
    if strategy == "centralized":
        assert m["utility"]["tstr_accuracy"] is None
        assert m["notes"].get("tstr_accuracy"), m["notes"]
        assert m["shared_artifacts"] == [] and uploads == []  # nothing leaves the (single) site
    else:
        assert 0.0 <= m["utility"]["tstr_accuracy"] <= 1.0
        assert "tstr_accuracy" not in m["notes"]
        assert m["shared_artifacts"] == ["vae", "vae_spec", "global_vae (downlink)"]
        assert len(uploads) == 4  # three uplinks and the broadcast global model
        for path in uploads:
            assert json.loads(path.with_suffix(".json").read_text())["kind"] == "vae"
            with safe_open(str(path), framework="pt") as fh:
                assert any(k.startswith("vae.encoder.") for k in fh.keys())  # FedAvg shares everything


def test_latent_gmm_is_declared_as_an_extra_shared_artifact(tmp_path):
    run, m = _run(tmp_path, "gmm", server={"sampling": "gmm", "gmm_components": 3})
    assert "latent_gmm" in m["shared_artifacts"]
    uploads = sorted((run.path / "shared" / "round-0").glob("client-*.safetensors"))
    assert len(uploads) == 3
    for path in uploads:
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["extra_artifacts"] == ["latent_gmm"]
        up = load_uplink(path)
        gmm = up.extras["latent_gmm"]
        assert set(gmm) == {"weights", "means", "covariances"}
        assert gmm["means"].shape == (3, up.spec["latent_dim"])
        assert float(gmm["weights"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_domain_cnn_training_is_deterministic():
    """The second run above reuses the cached domain CNN; its training must be reproducible too."""
    import torch

    from federation.metrics.domain_cnn import fit_classifier

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    a, b, c = (fit_classifier(x, y, 10, 1, seed, batch_size=32).state_dict() for seed in (4, 4, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_prior_sampling_shares_no_gmm(alignfl_seed0):
    run, m = alignfl_seed0
    assert "latent_gmm" not in m["shared_artifacts"]
    paths = list((run.path / "shared" / "round-0").glob("*.json"))
    assert len(paths) == 4
    for path in paths:
        assert json.loads(path.read_text())["extra_artifacts"] == []


def test_heterogeneous_clients_share_decoders_of_their_own_architectures(tmp_path):
    """Each client has its own architecture; the server rebuilds every decoder from its spec alone
    and decodes at that decoder's own latent width."""
    clients = [{"arch": "conv", "latent_dim": 3, "channels": [4, 8], "fc": 16},
               {"arch": "mlp", "latent_dim": 2, "hidden": [32, 16]},
               {"arch": "mlp", "latent_dim": 4, "hidden": [24]}]
    run, m = _run(tmp_path, "hetero", clients=clients)
    assert m["rejected_uploads"] == []
    for k, want in enumerate(clients):
        up = load_uplink(run.path / "shared" / "round-0" / f"client-{k}.safetensors")
        assert up.spec["arch"] == want["arch"] and up.spec["latent_dim"] == want["latent_dim"]
        assert not any(name.startswith("encoder") for name in up.tensors)
    assert 0.0 <= m["utility"]["tstr_accuracy"] <= 1.0
