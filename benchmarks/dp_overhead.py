"""DP-SGD step overhead on the paper VAE at batch 128: DP step time / non-DP step time.

    python benchmarks/dp_overhead.py [--reps 7] [--steps 20]

All modes run in one process, interleaved rep by rep, on the same real images (the embedded MNIST
subset); the figure is the median over reps of each mode's mean step time. Results go to
benchmarks/results/dp_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from federation.data.sources import EMBEDDED_ROOT, DataSource, load_split
from federation.models import VAE, vae_loss
from federation.privacy.dp_sgd import DPTrainer, make_plan
from federation.privacy.spec import PrivacySpec
from federation.training import to_tensor

SPEC = {"arch": "mlp", "latent_dim": 2, "hidden": [512, 256, 128]}
MODES = [("bk", "fixed"), ("bk", "adaptive"), ("ghost", "fixed"), ("ghost", "adaptive"), ("hooks", "fixed"),
         ("hooks", "adaptive"), ("functorch", "fixed")]


def nondp_stepper(x):
    vae = VAE(SPEC, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    noise = torch.Generator().manual_seed(1)

    def step():
        recon, mu, logvar = vae(x, noise)
        loss = vae_loss(x, recon, mu, logvar, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def dp_stepper(x, mode, clipping, n):
    vae = VAE(SPEC, torch.Generator().manual_seed(0))
    spec = PrivacySpec(mechanism="dp-sgd", noise_multiplier=1.0, clipping=clipping, grad_sample_mode=mode).validate()
    plan = make_plan(spec, n, len(x), 1.0)
    trainer = DPTrainer(vae, spec, plan, 1e-3, 1.0, n, torch.Generator().manual_seed(0),
                        torch.Generator().manual_seed(1))
    return lambda: trainer.step(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dp_overhead.json")
    args = parser.parse_args()
    images = load_split(DataSource(EMBEDDED_ROOT, "embedded"), "mnist", "train").images
    x = to_tensor(images[: args.batch])
    n = 12000  # a paper client's record count: q = 128 / 12000
    steppers = {"non-dp": nondp_stepper(x)}
    steppers.update({f"{m}/{c}": dp_stepper(x, m, c, n) for m, c in MODES})
    times = {k: [] for k in steppers}
    for fn in steppers.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(args.reps):
        for name, fn in steppers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"batch": args.batch, "reps": args.reps, "steps_per_rep": args.steps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "median_step_seconds": median,
              "overhead_vs_nondp": {k: v / median["non-dp"] for k, v in median.items() if k != "non-dp"},
              "all_step_seconds": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in median.items():
        print(f"{k:<20} {v * 1000:8.2f} ms/step  x{v / median['non-dp']:.2f}")


if __name__ == "__main__":
    main()
