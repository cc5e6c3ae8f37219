"""Epsilon from recorded DP events: every accountant, under both neighbouring relations.

Which neighbours. Every upload carries the client's record count n (it sets the sampling rate q = B/n,
and the message declares it). Under add/remove adjacency a neighbouring dataset holds n - 1 or n + 1
records, so a release of n tells the two apart with certainty: strictly, epsilon is unbounded. The relation
consistent with releasing n is replace-one (the same n, one record swapped for another), so the headline is
replace-one. Add/remove, with n treated as public as Opacus and most tools do, is reported beside it.

Which accountant computes which relation (``federation.privacy.accountants``), each an upper bound on the true
epsilon of the Poisson-subsampled Gaussian mechanism:

    add-remove   Opacus RDP, Opacus PRV, dp-accounting RDP, dp-accounting PLD
    replace-one  dp-accounting PLD (its replace-one analysis of Poisson subsampling), and dp-accounting
                 RDP turned into replace-one by group privacy (looser, always computable)

Per relation the headline is the tightest that succeeded. An accountant that fails, or that its bound on
time and memory stops, is noted, not raised; the headline then comes from the others (RDP at the least).

The noise is calibrated to ``privacy.target_epsilon`` under replace-one too (``federation.privacy.budget``),
so the headline meets the target and the add/remove value lies below it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

from absl import logging as absl_logging

from federation.privacy import accountants
from federation.privacy.accountants import PRV_EPS_ERROR, ResourceLimit, merged_history
from federation.errors import ConfigError

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")  # add-remove
REPLACE_ONE_ACCOUNTANTS = ("dp_accounting_pld", "dp_accounting_rdp_replace_one")
RELATIONS = {"replace-one": REPLACE_ONE_ACCOUNTANTS, "add-remove": ACCOUNTANTS}  # the headline's first
HEADLINE_RELATION = "replace-one"
HEADLINE_REASON = ("replace-one: every upload carries the client's record count n, which an add/remove neighbour "
                   "would change, so with n released add/remove epsilon is strictly unbounded; replace-one (same n, "
                   "one record swapped) is the relation the release is consistent with. The add/remove value treats "
                   "n as public (as Opacus does) and is given for comparison")
LEGACY_RELATION = "add-remove"  # the only relation of privacy blocks written before both were reported

_FUNCS = {"opacus_rdp": accountants.opacus_rdp, "opacus_prv": accountants.opacus_prv,
          "dp_accounting_rdp": accountants.dp_accounting_rdp, "dp_accounting_pld": accountants.dp_accounting_pld}
_REPLACE_ONE_FUNCS = {"dp_accounting_pld": lambda h, d: accountants.dp_accounting_pld(h, d, "replace-one"),
                      "dp_accounting_rdp_replace_one": accountants.dp_accounting_rdp_replace_one}
_BY_RELATION = {"add-remove": _FUNCS, "replace-one": _REPLACE_ONE_FUNCS}


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs each RDP order it drops as non-convergent (the order is then excluded,
    which can only loosen its bound); keep that out of the user's terminal."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl_logging.set_verbosity(level)


def check_history(history, delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, steps in history:
        if not sigma >= 0:
            raise ConfigError(f"noise multiplier must be >= 0, got {sigma}")
        if not 0 < q <= 1:
            raise ConfigError(f"sampling rate must be in (0, 1], got {q}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ConfigError(f"steps must be a non-negative integer, got {steps}")


def epsilons(history: list[tuple[float, float, int]], delta: float, relation: str = "add-remove") -> dict:
    """Under one relation: {accountant: {"epsilon": float | None, "error": str | None}} plus "headline",
    "flags", "notes" and "relation"."""
    check_history(history, delta)
    if relation not in RELATIONS:
        raise ConfigError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
    history = merged_history(history)
    funcs = _BY_RELATION[relation]
    results: dict = {}
    notes: list[str] = []
    coarse: set[str] = set()
    for name in RELATIONS[relation]:
        if not history:
            results[name] = {"epsilon": 0.0, "error": None}
            continue
        if any(sigma == 0 for sigma, _, _ in history):
            results[name] = {"epsilon": math.inf, "error": None}
            continue
        try:
            with _quiet():
                out = funcs[name](history, delta)
            eps, note = out if isinstance(out, tuple) else (out, None)
            if not math.isfinite(eps) or eps < 0:
                raise ValueError(f"returned {eps}")
            results[name] = {"epsilon": eps, "error": None}
            if note:
                notes.append(f"{name}: {note}")
                coarse.add(name)
        except ResourceLimit as err:
            results[name] = {"epsilon": None, "error": f"not computed: {err}"}
        except Exception as err:  # noqa: BLE001 - an accountant failing falls back, with a note
            results[name] = {"epsilon": None, "error": f"{type(err).__name__}: {err}"}
    ok = {k: v["epsilon"] for k, v in results.items() if v["epsilon"] is not None}
    if not ok:
        raise ConfigError(f"no accountant could compute epsilon for this history ({relation})")
    best = min(ok, key=ok.get)
    missing = [k for k in results if k in ("opacus_prv", "dp_accounting_pld") and k not in ok]
    if missing:
        notes.append(f"{' and '.join(missing)} not computed (see its error): the headline is the tightest of "
                     f"{', '.join(sorted(ok))}")
    return {"relation": relation, "accountants": results, "headline": {"accountant": best, "epsilon": ok[best]},
            "flags": _disagreements(ok, coarse), "notes": notes}


def client_epsilons(history: list[tuple[float, float, int]], delta: float) -> dict:
    """Both relations for one client's history, and the headline (``HEADLINE_RELATION``'s)."""
    relations = {relation: epsilons(history, delta, relation) for relation in RELATIONS}
    return {"headline": {"relation": HEADLINE_RELATION, **relations[HEADLINE_RELATION]["headline"]},
            "relations": relations}


def _disagreements(eps: dict, coarse: set[str] = frozenset()) -> list[str]:
    """Flags beyond the accountants' own error bounds.

    PRV (Opacus, eps_error) and PLD (pessimistic, discretization) are both near-exact: they must
    agree within PRV's eps_error plus 1% of epsilon for PLD's discretization. The two RDP
    accountants use different order grids; they must agree within 5%. An RDP bound (group privacy
    included) is a looser upper bound, so none may fall below a near-exact one by more than the
    same tolerance. A PLD on a coarsened grid (``coarse``) is looser by design: it may exceed the
    others, and is flagged only when it falls below PRV."""
    flags = []
    if not all(math.isfinite(v) for v in eps.values()):
        return flags
    tight = {k: eps[k] for k in ("opacus_prv", "dp_accounting_pld") if k in eps}
    tol = PRV_EPS_ERROR + 0.01 * max(eps.values())
    if len(tight) == 2:
        prv, pld = tight["opacus_prv"], tight["dp_accounting_pld"]
        if pld < prv - tol or (abs(prv - pld) > tol and "dp_accounting_pld" not in coarse):
            flags.append(f"PRV ({prv:.4f}) and PLD ({pld:.4f}) differ by more than {tol:.4f}")
    pair = [eps[k] for k in ("opacus_rdp", "dp_accounting_rdp") if k in eps]
    if len(pair) == 2 and abs(pair[0] - pair[1]) > 0.05 * max(pair):
        flags.append(f"Opacus RDP ({pair[0]:.4f}) and dp-accounting RDP ({pair[1]:.4f}) differ by more than 5%")
    rdp = [v for k, v in eps.items() if "rdp" in k]
    fine = [v for k, v in tight.items() if k not in coarse]
    if fine and rdp and min(rdp) < max(fine) - tol:
        flags.append(f"an RDP bound ({min(rdp):.4f}) is below a PRV/PLD bound ({max(fine):.4f})")
    return flags


def ledger_epsilons(ledger: dict) -> dict:
    """Per-client results for a ledger (a ``PrivacyLedger.to_json()`` dict), both relations each, and the
    run's headline (:func:`run_epsilon`). Mechanisms without a formal guarantee get no epsilon, only the
    reason."""
    from federation.privacy.ledger import PrivacyLedger

    led = PrivacyLedger.from_json(ledger)
    out = {"mechanism": led.mechanism, "formal_guarantee": led.formal_guarantee, "note": led.note,
           "delta": led.delta, "target_epsilon": led.target_epsilon, "clients": {}}
    if not led.formal_guarantee:
        out["epsilon_withheld"] = led.note
        return out
    out.update(relation=HEADLINE_RELATION, relation_reason=HEADLINE_REASON)
    computed: dict[tuple, dict] = {}  # clients with the same history (same n, sigma, steps) share one result
    for cid in led.client_ids():
        if str(cid) in led.unaccounted:  # some of its spend could not be read: no epsilon, never an under-count
            out.setdefault("unaccounted", {})[str(cid)] = led.unaccounted[str(cid)]
            continue
        history = tuple(led.history(cid))
        if history not in computed:
            computed[history] = client_epsilons(list(history), led.delta)
        out["clients"][str(cid)] = copy.deepcopy(computed[history])
    out["headline"] = run_epsilon(out)
    return out


def run_epsilon(privacy: dict) -> dict | None:
    """The run's accountant epsilon from a privacy block (:func:`ledger_epsilons`' output, as metrics.json
    records it): the largest per-client epsilon under the headline's relation and the client it belongs to,
    and the largest under add/remove. None without a formal guarantee or without an accounted client.

    The one place that picks the run's epsilon out of its clients. A block written before both relations
    were reported holds add/remove only, and the result says so (``relation``)."""
    clients = privacy.get("clients") or {}
    if not privacy.get("formal_guarantee") or not clients:
        return None
    headline = {cid: c["headline"]["epsilon"] for cid, c in clients.items()}
    add_remove = {cid: (c["relations"]["add-remove"]["headline"]["epsilon"] if "relations" in c
                        else c["headline"]["epsilon"]) for cid, c in clients.items()}
    top = max(headline, key=headline.get)
    return {"relation": clients[top]["headline"].get("relation", LEGACY_RELATION), "epsilon": headline[top],
            "client": top, "add_remove_epsilon": max(add_remove.values()), "delta": privacy.get("delta"),
            "unaccounted_clients": sorted(privacy.get("unaccounted", {}))}
