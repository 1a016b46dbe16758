"""`benchmarks/cnf.py`: ours against TFP's FFJORD on the same problem, and
the regularisers' variants, in a few iterations."""

import json
import math

import numpy as np
import pytest

from conftest import tensorflow_only

pytestmark = tensorflow_only("TFP's FFJORD is TensorFlow's")


def test_both_libraries_solve_the_same_flow_at_their_initial_weights():
    from benchmarks import cnf
    from examples.cnf import two_moons

    x = two_moons(16, seed=3)
    ours_dynamics, tfp_dynamics = cnf.dynamics_pair(64, 3, seed=0)
    ours = cnf.our_flow(ours_dynamics, 1e-3, seed=0)
    tfp_flow = cnf.TFPFlow(tfp_dynamics, 1e-3)
    ours_log_prob = ours.log_prob(x).numpy()
    tfp_log_prob = tfp_flow.log_prob(x).numpy()
    np.testing.assert_allclose(ours_log_prob, tfp_log_prob, rtol=1e-3)
    # Not trivially so: the flow moves the density away from the base's.
    base = -0.5 * np.sum(x ** 2, axis=1) - math.log(2 * math.pi)
    assert np.max(np.abs(ours_log_prob - base)) > 0.05


def test_a_non_finite_loss_stops_the_training_it_happened_in():
    from benchmarks import cnf
    from examples.cnf import two_moons

    flow = cnf.our_flow(cnf.dynamics_pair(8, 3, seed=0)[0], 1e-3, seed=0)
    trainee = cnf.Trainee(flow, 1e-2, counts=lambda: (0, 0))
    batches = [two_moons(16, seed=seed) for seed in range(2)]
    trainee.train(batches[:1])
    # A finite point so far out that its base log-density overflows.
    batches[1][0, 0] = 1e30
    with pytest.raises(FloatingPointError,
                       match="^non-finite loss at iteration 2$"):
        trainee.train(batches[1:])
    assert trainee.iterations == 1 and len(trainee.loss) == 1


@pytest.mark.slow
def test_benchmark_writes_both_libraries_and_all_variants(tmp_path):
    from benchmarks import cnf

    out = tmp_path / "cnf.json"
    cnf.main(["--iterations", "4", "--rounds", "1", "--warmup", "1",
              "--batch-size", "64", "--test-points", "256", "--tol", "1e-3",
              "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("date", "machine", "versions", "command", "git_commit"):
        assert key in result
    assert set(result["versions"]) >= {"tensorflow", "tensorflow-probability",
                                       "keras", "keras-node"}
    part = result["tfp"]
    assert set(part["libraries"]) == {"keras-node", "tfp"}
    assert part["initial_log_prob_max_abs_diff"] < 1e-2
    for name, row in part["libraries"].items():
        assert row["iterations"] == 4
        for key in ("median_step_s", "held_out_nll", "nfe_forward_last_20"):
            assert math.isfinite(row[key]) and row[key] >= 0, (name, key)
    assert math.isfinite(part["libraries"]["keras-node"]
                         ["nfe_backward_last_20"])
    assert math.isfinite(part["step_time_ratio"])
    assert isinstance(part["goal"]["met"], bool)
    variants = result["regularisers"]["variants"]
    assert set(variants) == {"none", "kinetic_energy", "jacobian_norm",
                             "both"}
    for name, row in variants.items():
        for key in ("nfe_forward_last_20", "nfe_backward_last_20",
                    "held_out_nll", "train_s"):
            assert math.isfinite(row[key]), (name, key)
        assert row["nfe_forward_last_20"] > 0
    assert variants["both"]["kinetic_energy"] > 0
    assert variants["both"]["jacobian_norm"] > 0
    # Without regulariser, part 2's flow is part 1's: the same numbers.
    assert variants["none"]["held_out_nll"] == pytest.approx(
        part["libraries"]["keras-node"]["held_out_nll"], rel=1e-5)
