"""The run directory's layout: every file name and format version, defined once.

The run directory is the contract between training, audit and report. Every JSON file carries a
``format`` version; a run written before formats existed is run format 1 (``alignfl-run/1``), and its
readers (the audit, the report) read it by that version or refuse it with a line that says why.

    config.resolved.yaml        every setting (format alignfl-config/N)
    partition.json              record ids per client, held-out pools, outliers, controls, canaries
    shared/round-R/             every message that crossed the boundary in round R:
        client-K.safetensors + .json           the uplink from client K (what left the client)
        server-to-client-K.safetensors + .json the downlink to client K alone
        server-to-clients.safetensors + .json  one downlink sent to several clients (recipients listed)
    privacy_ledger.json         every DP-SGD event per client
    metrics.json                utility, privacy, provenance (written last: a run is complete with it)
    rounds.csv                  per round: every client's status, loss, staleness, weight; server loss; probe
    status.json, run.log, figures/, checkpoints/latest.pt (resume state, deleted on completion)
    audit.json, audit/          the audit
    report.html                 the report
"""
from __future__ import annotations

import re

RUN_FORMAT = "alignfl-run/2"
LEGACY_RUN_FORMAT = "alignfl-run/1"  # written before run formats existed
READABLE_RUN_FORMATS = (LEGACY_RUN_FORMAT, RUN_FORMAT)

CONFIG = "config.resolved.yaml"
PARTITION = "partition.json"
PARTITION_FORMAT = "alignfl-partition/2"
LEDGER = "privacy_ledger.json"
LEDGER_FORMAT = "alignfl-ledger/2"
METRICS = "metrics.json"
# metrics.json: /3 reports each client's epsilon under both neighbouring relations (privacy.clients.K.relations)
# with the headline's relation named (replace-one), and the run's headline (privacy.headline); /2 and earlier
# hold add/remove only and still read (alignfl_audit.accounting.run_epsilon)
METRICS_FORMAT = "alignfl-metrics/3"
ROUNDS = "rounds.csv"
STATUS = "status.json"
LOG = "run.log"
FIGURES = "figures"
SHARED = "shared"
CHECKPOINTS = "checkpoints"
CHECKPOINT = "latest.pt"
AUDIT = "audit.json"
AUDIT_DIR = "audit"
AUDIT_FIGURES = "audit/figures"
REPORT = "report.html"

ROUND_DIR = re.compile(r"round-(\d+)$")
UPLINK_FILE = re.compile(r"client-(\d+)\.safetensors$")
DOWNLINK_FILE = re.compile(r"server-to-client(?:-(\d+)|s)\.safetensors$")


def shared_round(rnd: int) -> str:
    return f"{SHARED}/round-{rnd}"


def client_columns(client: int) -> dict[str, str]:
    """rounds.csv's columns for one client."""
    return {key: f"client{client}_{key}" for key in ("participated", "status", "loss", "staleness", "weight")}


LOSS_COLUMN = re.compile(r"^(client\d+|server)_loss$")
STATUS_COLUMN = re.compile(r"^client(\d+)_status$")


def run_format(metrics: dict) -> str:
    """The run format a finished run's metrics.json records (format 1 when it records none)."""
    return metrics.get("run_format", LEGACY_RUN_FORMAT) if isinstance(metrics, dict) else LEGACY_RUN_FORMAT

# audit.json: /2 splits the outlier verdict (memorisation; mapped to typical points) and records the
# class-matched membership game; /3 adds the audit's sensitivity (the game's AUC half-width) and the ceiling
# of every epsilon bound; /4 adds the summary block (the best attack, the run's epsilons and verdicts, picked
# once: alignfl_audit.audit_summary) and the accountant under both neighbouring relations; /1 to /3 files still
# render (without those; their summary is computed on reading by the same function)
AUDIT_FORMAT = "alignfl-audit/4"
READABLE_AUDIT_FORMATS = ("alignfl-audit/1", "alignfl-audit/2", "alignfl-audit/3", AUDIT_FORMAT)
