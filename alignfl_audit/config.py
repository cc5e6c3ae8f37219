"""The experiment config schema: YAML -> typed, validated dataclasses.

Every key is checked: an unknown key, a value of the wrong type or an impossible value raises
``ConfigError`` with the key's dotted path, before any data is read or any directory is made.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attacks.outlier_verdicts import TYPICAL_MAPPING_RATE, check_rate
from federation.data.partition import PartitionSpec
from federation.data.sources import OTHER_DATASET, check_dataset_name
from federation.errors import ConfigError, DataError
from federation.models import normalize_spec
from federation.engines import ENGINES, engine_settings_class
from federation.precision import PRECISIONS
from federation.privacy.spec import FAULT_KEY, PrivacySpec
from federation.strategies import STRATEGIES, strategy_class
from federation.strategies.alignfl import AlignFLServerSettings, AlignFLSettings
from federation.engines.inprocess import InProcessSettings
from federation.training import TrainSettings

CONFIG_FORMAT = "alignfl-config/2"  # config.resolved.yaml of runs written before formats existed: version 1


@dataclass
class DataConfig:
    dataset: str = "mnist"
    root: typing.Optional[str] = None
    download: bool = False
    allow_embedded: bool = True


@dataclass
class MetricsConfig:
    fid_samples: int = 5000
    domain_cnn_epochs: int = 3
    tstr_epochs: int = 3
    probe_max_iter: int = 1000
    probe_every_round: bool = True
    figures: bool = True


@dataclass
class AuditConfig:
    """How ``alignfl-audit audit`` attacks a finished run (see docs/threat-model.md). ``audit: true`` in a
    config is short for ``audit: {enabled: true}``: ``alignfl-audit run`` then audits the run it trained."""

    enabled: bool = False
    members_per_client: int = 500  # members drawn from a client's training records; as many non-members
    latent_fit_steps: int = 60  # Adam steps refining each latent
    latent_fit_restarts: int = 3  # best prior inits refined per record
    latent_fit_init: int = 1024  # prior samples decoded once to seed the restarts
    latent_fit_lambda: float = 0.01  # weight of ||z||^2 in the latent-fit objective
    latent_fit_precision: str = "fp32"  # fp32 | bf16: the decoder's precision while latents are refined
    generated_samples: int = 10000  # Monte-Carlo and nearest-sample attacks
    reference_models: bool = True  # reference-calibrated attacks (one reference VAE per client)
    reference_epochs: typing.Optional[int] = None  # default: the run's rounds x local_epochs
    bootstrap: int = 200  # resamples for the 95% CIs
    alpha: float = 0.05  # confidence level of every empirical-epsilon bound is 1 - alpha
    inliers: int = 200  # inliers of the outlier client reconstructed next to the outliers
    reconstruction_threshold: float = 0.5  # normalized distance below which a record counts as reconstructed
    # the fraction of a group's reconstructions the domain classifier must map to typical points: the
    # inliers', for the classifier to be trusted on the decoder (else "cannot judge"); the outliers', for
    # the paper's claim "outliers are mapped to typical points" to hold
    typical_mapping_rate: float = TYPICAL_MAPPING_RATE
    lipschitz_prior_points: int = 256
    lipschitz_ascent_steps: int = 20
    # rounds whose decoders get a Lipschitz bracket, per client: None = every round it shared; N = N rounds
    # evenly spaced over them, always with its final one (the bracket the report's summary shows)
    lipschitz_rounds: typing.Optional[int] = None
    canary_guesses: float = 0.2  # one-run audit: guess "in"/"out" for this fraction of canaries each side


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    model: dict = field(default_factory=lambda: {"arch": "mlp", "latent_dim": 2, "hidden": [512, 256, 128]})
    clients: typing.Optional[list] = None  # per-client model specs; default: every client uses `model`
    training: TrainSettings = field(default_factory=TrainSettings)
    # the strategy's own sections: `strategy` (tagged by name) and `server` (None: no federation);
    # `engine` (tagged by name) carries the messages. See federation/strategies and federation/engines.
    strategy: typing.Any = field(default_factory=AlignFLSettings)
    server: typing.Any = field(default_factory=AlignFLServerSettings)
    engine: typing.Any = field(default_factory=InProcessSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report: bool = False  # after the run (and its audit): write report.html into the run directory

    # ---------------------------------------------------------------- derived
    @property
    def outlier_dataset(self) -> str:
        return self.partition.outliers.source or OTHER_DATASET[self.data.dataset]

    def client_specs(self) -> list[dict]:
        n = self.partition.n_clients
        if self.clients is None:
            return self._constrained([normalize_spec(self.model) for _ in range(n)])
        default_arch = self.model.get("arch", "mlp")
        # a client entry overrides the default model; a different architecture starts from its own defaults
        specs = [normalize_spec({**self.model, **c} if c.get("arch", default_arch) == default_arch else c)
                 for c in self.clients]
        return self._constrained(specs)

    def _constrained(self, specs: list[dict]) -> list[dict]:
        if self.privacy.mechanism == "lcd-spectral":  # the hard Lipschitz constraint lives in the spec
            specs = [{**s, "spectral_norm": True} for s in specs]
        return specs

    @property
    def strategy_class(self):
        return strategy_class(self.strategy.name)

    def server_spec(self) -> dict:
        model = getattr(self.server, "model", None)
        return normalize_spec(model if model is not None else self.model)

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------- checks
    def validate(self) -> "ExperimentConfig":
        try:
            check_dataset_name(self.data.dataset)
            if self.partition.outliers.source is not None:
                check_dataset_name(self.partition.outliers.source)
        except DataError as err:
            raise ConfigError(str(err)) from None
        self.partition.validate()
        for path, value in (("training.rounds", self.training.rounds),
                            ("training.local_epochs", self.training.local_epochs),
                            ("training.batch_size", self.training.batch_size),
                            ("metrics.fid_samples", self.metrics.fid_samples),
                            ("metrics.domain_cnn_epochs", self.metrics.domain_cnn_epochs),
                            ("metrics.tstr_epochs", self.metrics.tstr_epochs),
                            ("metrics.probe_max_iter", self.metrics.probe_max_iter)):
            if value <= 0:
                raise ConfigError(f"{path} must be > 0, got {value}")
        for path, value in (("training.lr", self.training.lr), ("training.lambda_kl", self.training.lambda_kl)):
            if not value >= 0 or (path == "training.lr" and value == 0):
                raise ConfigError(f"{path} must be {'> 0' if path == 'training.lr' else '>= 0'}, got {value}")
        cls = self.strategy_class
        cls.check(self.strategy, self.server, self.partition.n_clients)
        self.engine.check()
        if self.clients is not None:
            if not isinstance(self.clients, list) or len(self.clients) != self.partition.n_clients:
                raise ConfigError(f"clients must list one model spec per client ({self.partition.n_clients})")
            if not all(isinstance(c, dict) for c in self.clients):
                raise ConfigError("each entry of clients must be a model spec mapping")
        self.privacy.validate()
        _check_audit(self.audit)
        _check_canaries(self.partition.canaries.count, self.audit, self.privacy.delta)
        if self.audit.enabled and not cls.federated():
            raise ConfigError(f"audit: the {cls.name} strategy shares nothing (it has no federation), so there is "
                              "nothing to audit; set audit: false or pass --no-audit")
        if self.privacy.mechanism not in cls.privacy_mechanisms:
            supported = [n for n, c in STRATEGIES.items() if self.privacy.mechanism in c.privacy_mechanisms]
            raise ConfigError(f"privacy.mechanism {self.privacy.mechanism!r} is implemented for the "
                              f"{', '.join(supported)} strategies, not {cls.name}")
        specs = self.client_specs()
        self.server_spec()
        cls.check_setup(self.strategy, specs, self.privacy)
        if self.training.precision not in PRECISIONS:
            raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}, got {self.training.precision!r}")
        if self.training.precision not in cls.precisions:
            raise ConfigError(f"training.precision {self.training.precision} is implemented for the "
                              f"{', '.join(n for n, c in STRATEGIES.items() if self.training.precision in c.precisions)} "
                              f"strategies, not {cls.name}")
        if self.privacy.is_dp and (self.privacy.grad_sample_mode == "bk" or self.training.precision != "fp32"):
            _check_bk(self.privacy, specs, self.training.precision)
        if cls.same_architecture and any(s != specs[0] for s in specs):
            raise ConfigError(f"{cls.name} averages parameters and needs one architecture for all "
                              "clients; the clients list differs")
        return self


def _check_audit(a: AuditConfig) -> None:
    for name in ("members_per_client", "latent_fit_steps", "latent_fit_restarts", "latent_fit_init",
                 "generated_samples", "bootstrap", "inliers", "lipschitz_prior_points"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"audit.{name} must be > 0, got {getattr(a, name)}")
    if a.latent_fit_precision not in PRECISIONS:
        raise ConfigError(f"audit.latent_fit_precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {a.latent_fit_precision!r}")
    if a.lipschitz_rounds is not None and a.lipschitz_rounds <= 0:
        raise ConfigError(f"audit.lipschitz_rounds must be > 0 (or null for every round), got {a.lipschitz_rounds}")
    if a.reference_epochs is not None and a.reference_epochs <= 0:
        raise ConfigError(f"audit.reference_epochs must be > 0, got {a.reference_epochs}")
    if a.lipschitz_ascent_steps < 0 or not a.latent_fit_lambda >= 0:
        raise ConfigError("audit.lipschitz_ascent_steps and audit.latent_fit_lambda must be >= 0")
    if not 0 < a.alpha < 1:
        raise ConfigError(f"audit.alpha must be in (0, 1), got {a.alpha}")
    if not 0 < a.canary_guesses <= 0.5:
        raise ConfigError(f"audit.canary_guesses must be in (0, 0.5], got {a.canary_guesses}")
    if not a.reconstruction_threshold > 0:
        raise ConfigError(f"audit.reconstruction_threshold must be > 0, got {a.reconstruction_threshold}")
    check_rate(a.typical_mapping_rate, "audit.typical_mapping_rate")


def canary_guesses(count: int, a: AuditConfig) -> int:
    """r, the canary audit's guesses: audit.canary_guesses of the canaries on each side, at least one."""
    return 2 * max(1, int(a.canary_guesses * count))


def _check_canaries(count: int, a: AuditConfig, delta: float) -> None:
    """Canaries whose bound could never exceed 0 (too few guesses) are refused: they cost utility and can
    prove nothing."""
    from attacks.empirical_epsilon import one_run_ceiling

    if count and one_run_ceiling(count, canary_guesses(count, a), delta, a.alpha) == 0.0:
        raise ConfigError(f"partition.canaries.count {count} with audit.canary_guesses {a.canary_guesses} gives "
                          f"{canary_guesses(count, a)} guesses, whose one-run bound can never exceed 0 at "
                          f"audit.alpha {a.alpha}: insert more canaries or guess a larger fraction")


def _check_bk(privacy: PrivacySpec, specs: list[dict], precision: str = "fp32") -> None:
    """An explicit grad_sample_mode bk must fit every client's privatized module (built on the meta
    device: no memory, no initialization cost); so must a precision other than fp32 with DP-SGD, which
    only book-keeping clipping computes in float32 from a bfloat16 forward."""
    import torch

    from federation.models import VAE
    from federation.privacy.bookkeeping import resolve_grad_sample_mode

    for spec in {json.dumps(s, sort_keys=True): s for s in specs}.values():
        with torch.device("meta"):
            vae = VAE(spec)
        mode = resolve_grad_sample_mode(privacy, vae if privacy.scope == "full" else vae.decoder)
        if precision != "fp32" and mode != "bk":
            raise ConfigError(f"training.precision {precision} with DP-SGD needs grad_sample_mode bk (its per-sample "
                              f"norms, clipped sums and noise stay float32), but the {spec['arch']} model runs {mode}; "
                              "use training.precision fp32")


# -------------------------------------------------------------------- parsing
def _coerce(value, hint, path: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, path)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, bool) and "enabled" in {f.name for f in dataclasses.fields(hint)}:
            value = {"enabled": value}  # `audit: true` switches a section on with its defaults
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return value
    return value


def _build(cls, data, path: str, owner: str | None = None):
    """``owner`` names who declares the section (a strategy, an engine): a key it does not declare is
    refused as a setting that does not apply to it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown and owner:
        allowed = ", ".join(sorted(names - {"name"})) or "none"
        raise ConfigError(f"{path}.{unknown[0]} does not apply to {owner}; its {path} settings are: {allowed}")
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}{where}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _tagged(data, path: str, default: str, names: list[str]) -> str:
    if data is None:
        return default
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping, got {type(data).__name__}")
    name = data.get("name", default)
    if name not in names:
        raise ConfigError(f"unknown {path} {name!r}; choose one of {names}")
    return name


def from_dict(data: dict) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if data.pop("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ConfigError(f"this config was written in another format; this version reads {CONFIG_FORMAT}")
    if isinstance(data.get("privacy"), dict) and FAULT_KEY in data["privacy"]:
        raise ConfigError(f"privacy.{FAULT_KEY} is a test-only switch that breaks DP-SGD on purpose (for the "
                          "self-audit's tests); no config can set it")
    raw_strategy, raw_server, raw_engine = data.pop("strategy", None), data.pop("server", None), data.pop("engine", None)
    cfg = _build(ExperimentConfig, data, "")
    cls = strategy_class(_tagged(raw_strategy, "strategy", "alignfl", list(STRATEGIES)))
    owner = f"the {cls.name} strategy"
    cfg.strategy = _build(cls.Settings, raw_strategy, "strategy", owner)
    if cls.ServerSettings is None:
        if raw_server:
            key = next(iter(raw_server)) if isinstance(raw_server, dict) else None
            raise ConfigError(f"server{'.' + str(key) if key else ''} does not apply to {owner}: it has no federation "
                              "(no server, no rounds of messages); remove the server section")
        cfg.server = None
    else:
        cfg.server = _build(cls.ServerSettings, raw_server, "server", owner)
    engine = _tagged(raw_engine, "engine", "inprocess", list(ENGINES))
    cfg.engine = _build(engine_settings_class(engine), raw_engine, "engine", f"the {engine} engine")
    return cfg.validate()


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
    if isinstance(data.get("audit"), bool):  # `audit: true` shorthand, so audit.* overrides can apply
        data["audit"] = {"enabled": data["audit"]}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {key} is not a mapping")
        node[leaf] = value
    return from_dict(data)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------ configs of earlier runs
_V1_STRATEGY_KEYS = {"alignfl": (), "fedavg": (), "fedprox": ("mu",), "centralized": ("epochs",)}
_V1_SERVER_KEYS = {"alignfl": ("samples_per_client", "epochs", "sampling", "gmm_components", "participation", "model"),
                   "fedavg": ("samples_per_client", "participation"),
                   "fedprox": ("samples_per_client", "participation"), "centralized": None}


def migrate_config(data: dict) -> dict:
    """A resolved config as written before config formats (version 1) -> the current form. Version 1
    gave every strategy every key, and ignored those that did not apply; they are dropped here, which is
    exactly what that run did with them."""
    if not isinstance(data, dict) or "format" in data:
        return data
    data = dict(data)
    strategy = dict(data.get("strategy") or {})
    name = strategy.get("name", "alignfl")
    if name in _V1_STRATEGY_KEYS:
        data["strategy"] = {"name": name, **{k: strategy[k] for k in _V1_STRATEGY_KEYS[name] if k in strategy}}
        keys = _V1_SERVER_KEYS[name]
        server = data.pop("server", None) or {}
        if keys is not None:
            data["server"] = {k: server[k] for k in keys if k in server}
    data["format"] = CONFIG_FORMAT
    return data

