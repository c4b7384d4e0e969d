"""Batched EM through ``refine`` vs a loop of scikit-learn's GaussianMixture (issue 2).

256 point sets x 500 points x 4 components x 2-D (float64, like scikit-learn). Reports wall
times, their ratio and the mean log-likelihood per point of both fits and of the true
parameters.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pyro_slots as ps
from benchmarks.common import interleaved_medians, markdown_table, write_result
from pyro_slots.models import GaussianMixture


def point_sets(num_sets, num_points, num_components, dim, seed):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(num_sets, num_components, dim, generator=g, dtype=torch.float64)
    scales = 0.3 + 0.7 * torch.rand(num_sets, num_components, dim, generator=g, dtype=torch.float64)
    weights = torch.distributions.Dirichlet(torch.full((num_components,), 3.0, dtype=torch.float64))
    w = weights.sample((num_sets,))
    z = torch.multinomial(w, num_points, replacement=True, generator=g)
    idx = z.unsqueeze(-1).expand(-1, -1, dim)
    x = torch.gather(means, 1, idx) + torch.gather(scales, 1, idx) * torch.randn(
        num_sets, num_points, dim, generator=g, dtype=torch.float64
    )
    return x, means, scales, w


def true_loglik(x, means, scales, w):
    comp = torch.distributions.Normal(means.unsqueeze(2), scales.unsqueeze(2))
    lp = comp.log_prob(x.unsqueeze(1)).sum(-1) + w.log().unsqueeze(-1)
    return torch.logsumexp(lp, 1).mean().item()


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the Dirichlet draw of the mixing weights uses the global stream
    x, means, scales, w = point_sets(args.num_sets, args.num_points, args.num_components, 2, 0)
    gmm = GaussianMixture(args.num_components, 2)
    rule = ps.inner.EM(args.max_steps)

    def ours(dtype):
        return ps.refine(gmm, x.to(dtype), rule, seed=0, elbo_tol=args.elbo_tol)

    def sklearn_loop():
        scores = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for n in range(x.shape[0]):
                sk = SkGaussianMixture(
                    args.num_components, covariance_type="diag", n_init=1, random_state=n
                )
                scores.append(sk.fit(x[n].numpy()).score(x[n].numpy()))
        return float(np.mean(scores))

    # Interleaved rounds, medians: a change of load hits every method alike (one sklearn run,
    # timed alone, swung 0.5-1.9 s).
    methods = {
        torch.float64: lambda: ours(torch.float64),
        torch.float32: lambda: ours(torch.float32),
        "sklearn": sklearn_loop,
    }
    median = interleaved_medians(methods, args.repeats)
    rows, timings = [], {}
    for dtype in (torch.float64, torch.float32):
        t = median[dtype]
        result = ours(dtype)
        ll = (result.elbo.double() / args.num_points).mean().item()
        timings[dtype] = (t, ll)
        rows.append(
            [
                f"pyro_slots.refine(EM), {str(dtype).split('.')[-1]}",
                t,
                t / args.num_sets * 1e3,
                ll,
                f"{result.steps.double().mean().item():.1f} (max {result.num_steps})",
            ]
        )
    ll_sk = sklearn_loop()
    t_sk = median["sklearn"]
    ll_true = true_loglik(x, means, scales, w)
    rows.append(
        [
            "sklearn GaussianMixture loop (n_init=1), float64",
            t_sk,
            t_sk / args.num_sets * 1e3,
            ll_sk,
            "-",
        ]
    )
    rows.append(["true parameters", "-", "-", ll_true, "-"])
    table = markdown_table(["method", "wall s", "ms / set", "log-lik / point", "EM steps"], rows)
    ratios = "; ".join(
        f"{str(d).split('.')[-1]}: {t_sk / t:.1f}x faster, {ll - ll_sk:+.4f} nats/point vs sklearn"
        for d, (t, ll) in timings.items()
    )
    summary = (
        f"{args.num_sets} sets x {args.num_points} points x {args.num_components} components "
        f"x 2-D; greedy k-means++ seeding + 10 Lloyd steps, then EM; every set stops when its "
        f"log-likelihood per point changes by less than {args.elbo_tol} (scikit-learn's default "
        f"tol), the others go on; median of {args.repeats} rounds, each running every method once. "
        f"Load average before: {os.getloadavg()[0]:.2f}.\n\n{table}\n\n{ratios}"
    )
    print(summary)
    write_result("em", "Batched EM vs a scikit-learn loop", summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-sets", type=int, default=256)
    parser.add_argument("--num-points", type=int, default=500)
    parser.add_argument("--num-components", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--elbo-tol", type=float, default=3e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    main(parser.parse_args())
