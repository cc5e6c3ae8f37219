"""The inner loops of training and audit, variant against variant, in one process (issue 15's probes).

Medians of ``--repeats`` interleaved measurements at ``--threads`` threads, on the paper VAE
(784-512-256-128, latent 2), random records:

- ``training_step``: ms per step of ``federation.training.train_epochs`` at batch 128 with torch's
  unfused Adam in fp32, fused Adam in fp32 and in bf16; and of ``DPTrainer`` (bk, adaptive clipping)
  in fp32 and bf16;
- ``latent_fit``: seconds of ``attacks.latent_fit.fit_latents`` on 1000 records (3 restarts, 20 steps)
  at batches 256, 512 and 4096 in fp32, and 512 in bf16;
- ``tstr_classifier``: seconds of one epoch of ``fit_classifier`` on 1024 records, contiguous against
  channels-last;
- with ``--compile``: ms per step of the VAE step with its forward and loss under ``torch.compile``
  (fused Adam, fp32) against the same step eager, and the compile time (the first step).

    python benchmarks/kernels.py --threads 1 --repeats 5

Results: ``benchmarks/results/kernels.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from federation.metrics.domain_cnn import fit_classifier
from federation.models import VAE, build_decoder, vae_loss
from federation.privacy.dp_sgd import DPPlan, DPTrainer
from federation.privacy.spec import PrivacySpec
from federation.rng import seeded_generator
from federation.training import train_epochs
from attacks.latent_fit import fit_latents

SPEC = {"arch": "mlp", "latent_dim": 2, "hidden": [512, 256, 128]}
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training_cases(data: torch.Tensor) -> dict:
    steps = len(data) // 128

    def plain(fused: bool, precision: str):
        vae = VAE(SPEC, seeded_generator(0, 1))
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=fused)
        return lambda: train_epochs(vae, opt, data, 1, 128, 1.0, seeded_generator(0, 2), precision=precision)

    def dp(precision: str):
        vae = VAE(SPEC, seeded_generator(0, 1))
        spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.0, clipping="adaptive", grad_sample_mode="bk")
        plan = DPPlan(sample_rate=128 / len(data), noise_multiplier=1.0, steps_per_epoch=steps,
                      unclipped_num_std=128 / 20)
        trainer = DPTrainer(vae, spec.validate(), plan, 1e-3, 1.0, len(data), seeded_generator(0, 2),
                            seeded_generator(0, 3), precision=precision)
        return lambda: trainer.train_epochs(data, 1)

    cases = {"adam_fp32": plain(False, "fp32"), "fused_adam_fp32": plain(True, "fp32"),
             "fused_adam_bf16": plain(True, "bf16"), "dp_bk_fp32": dp("fp32"), "dp_bk_bf16": dp("bf16")}
    return {k: (lambda f=f: _timed(f) / steps * 1000) for k, f in cases.items()}  # ms per step


def latent_fit_cases() -> dict:
    decoder = build_decoder(SPEC, seeded_generator(0, 1)).eval().requires_grad_(False)
    records = torch.rand(1000, 1, 28, 28, generator=seeded_generator(0, 4))

    def fit(batch: int, precision: str):
        return lambda: _timed(lambda: fit_latents(decoder, records, 2, seeded_generator(1), steps=20, batch=batch,
                                                  precision=precision))

    return {"batch256_fp32": fit(256, "fp32"), "batch512_fp32": fit(512, "fp32"),
            "batch4096_fp32": fit(4096, "fp32"), "batch512_bf16": fit(512, "bf16")}


def tstr_cases() -> dict:
    x, y = torch.rand(1024, 1, 28, 28, generator=seeded_generator(0, 5)), torch.randint(0, 5, (1024,))
    return {f"channels_last_{cl}": (lambda cl=cl: _timed(lambda: fit_classifier(x, y, 5, 1, 0, channels_last=cl)))
            for cl in (False, True)}


def compile_cases(data: torch.Tensor) -> tuple[dict, dict]:
    def step_fn(compiled: bool):
        vae = VAE(SPEC, seeded_generator(0, 1))
        gen = seeded_generator(0, 2)
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)

        def loss(x, eps):
            mu, logvar = vae.encoder(x)
            return vae_loss(x, vae.decoder(mu + eps * torch.exp(0.5 * logvar)), mu, logvar, 1.0)

        fn = torch.compile(loss) if compiled else loss

        def step():
            x = data.index_select(0, torch.randint(0, len(data), (128,), generator=gen))
            out = fn(x, torch.randn(128, 2, generator=gen))
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
        return step

    steps = {k: step_fn(k == "compiled") for k in ("eager", "compiled")}
    first = {k: round(_timed(s), 2) for k, s in steps.items()}  # the compiled one compiles here
    return {k: (lambda s=s: _timed(s) * 1000) for k, s in steps.items()}, first


def measure(cases: dict, repeats: int) -> dict:
    for fn in cases.values():
        fn()  # warm-up
    values = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            values[k].append(fn())
    return {k: round(statistics.median(v), 3) for k, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile of the VAE step")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = torch.rand(2048, 1, 28, 28, generator=seeded_generator(0, 6))
    out = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
           "training_step_ms": measure(training_cases(data), args.repeats),
           "latent_fit_seconds": measure(latent_fit_cases(), args.repeats),
           "tstr_classifier_epoch_seconds": measure(tstr_cases(), args.repeats)}
    if args.compile:
        cases, first = compile_cases(data)
        out["compile_step_ms"] = measure({k: (lambda f=f: statistics.mean(f() for _ in range(20)))
                                          for k, f in cases.items()}, args.repeats)
        out["compile_first_step_seconds"] = first
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
