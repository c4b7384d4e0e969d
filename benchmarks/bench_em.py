"""Batched EM through ``refine`` vs a loop of scikit-learn's GaussianMixture (issue 2).

256 point sets x 500 points x 4 components x 2-D (float64, like scikit-learn). Reports wall
times, their ratio and the mean log-likelihood per point of both fits and of the true
parameters.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from pyro_slots.models import GaussianMixture
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import pyro_slots as ps
from benchmarks.common import markdown_table, median_time, write_result


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
    x, means, scales, w = point_sets(args.num_sets, args.num_points, args.num_components, 2, 0)
    gmm = GaussianMixture(args.num_components, 2)
    rule = ps.inner.EM(args.max_steps)

    def ours():
        return ps.refine(gmm, x, rule, seed=0, elbo_tol=args.elbo_tol)

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

    t_ours = median_time(ours, repeats=args.repeats)
    result = ours()
    ll_ours = (result.elbo / args.num_points).mean().item()
    start = time.perf_counter()
    ll_sk = sklearn_loop()
    t_sk = time.perf_counter() - start
    ll_true = true_loglik(x, means, scales, w)
    rows = [
        [
            "pyro_slots.refine(EM, k-means++ init)",
            t_ours,
            t_ours / args.num_sets * 1e3,
            ll_ours,
            result.num_steps,
        ],
        ["sklearn GaussianMixture loop (n_init=1)", t_sk, t_sk / args.num_sets * 1e3, ll_sk, "-"],
        ["true parameters", "-", "-", ll_true, "-"],
    ]
    table = markdown_table(["method", "wall s", "ms / set", "log-lik / point", "EM steps"], rows)
    summary = (
        f"{args.num_sets} sets x {args.num_points} points x {args.num_components} components "
        f"x 2-D, float64, EM stops when every set's log-likelihood per point changes by less "
        f"than {args.elbo_tol} (scikit-learn's default tol), median of {args.repeats} runs "
        "(sklearn: one run).\n\n"
        f"{table}\n\nspeed-up over the sklearn loop: {t_sk / t_ours:.1f}x; "
        f"log-likelihood difference (ours - sklearn): {ll_ours - ll_sk:+.4f} nats/point"
    )
    print(summary)
    write_result("em", "Batched EM vs a scikit-learn loop", summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-sets", type=int, default=256)
    parser.add_argument("--num-points", type=int, default=500)
    parser.add_argument("--num-components", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--elbo-tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    main(parser.parse_args())
