"""The swap example runs with tiny arguments and both rules lower their objective."""


def test_swap_rules_example_trains_both_rules():
    import examples.swap_rules as example

    args = example.make_parser().parse_args(
        ["--num-updates=12", "--batch-size=8", "--num-points=40", "--hidden-dim=8"]
    )
    results = example.main(args)
    assert set(results) == {"em", "slot_attention"}
    # EM's only weights are the initializer's mean and log-scale (2 x slot_dim = 10).
    assert results["em"]["num_weights"] == 10
    assert results["slot_attention"]["num_weights"] > 10
    # Training improves the held-out ELBO over the untrained weights, for both rules
    # (observed: EM -3.85 -> -3.56, slot attention -22.1 -> -4.8 nats/point).
    for name, r in results.items():
        assert r["held_out_elbo"] > r["held_out_elbo_before"] + 0.1, name
