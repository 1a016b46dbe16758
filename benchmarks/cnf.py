"""Our continuous normalizing flow against TFP's FFJORD, and the regularisers.

    python -m benchmarks.cnf [--iterations 500] [--rounds 2] \\
        [--parts tfp regularisers]

Part `tfp`: `ContinuousNormalizingFlow` against `tfp.bijectors.FFJORD` on
the same toy data (`examples/cnf.py`'s, `--dataset`), the same dynamics
network (two `TimeMLP`s with identical initial weights), the same
Dormand-Prince tolerances (rtol = atol = `--tol`), the exact trace on both,
the same Adam learning rate and the same batches (`--batch-size` fresh
points per iteration), each trained by the same hand-written `tf.function`
step (GradientTape on the negative mean log-likelihood, Adam's
`apply_gradients`). The libraries alternate: `--rounds` rounds of
`--iterations` iterations each, each library continuing where it left off,
so that the machine's load falls on both alike. Step time is the median
over all steps but each library's first `--warmup` (the tracing). The
held-out negative log-likelihood (nats, `--test-points` points of another
seed, each library's own `log_prob`) is taken after every round.

Directions: ours carries the data at t0 = 0 to the base N(0, I) at t1 = 1
(`log_prob` solves forward in time, `sample` backward); TFP's FFJORD maps
base to data in its forward direction, so `TransformedDistribution.log_prob`
solves its inverse ODE `dz/ds = -g(t1 - s, z)`. Both solve the same ODE when
TFP's network is `g(t, z) = -f(1 - t, z)` for ours `f(t, z)` (here
`f = TimeMLP`), which is what is given to FFJORD: at identical weights the
two are the same density and `initial_log_prob_max_abs_diff` checks it.
Gradients: both adjoint (ours with its default seminorm and error control,
TFP's DormandPrince with its own), so evaluation counts may differ at the
same tolerance.

Part `regularisers`: ours alone with no regulariser, `kinetic_energy=K`,
`jacobian_norm=J` and both (Finlay et al. 2020), the same seed, data and
step (the loss then includes the penalty; the held-out NLL does not),
alternated in rounds as above: mean forward and backward evaluations over
the last 20 iterations, held-out NLL, total training seconds.

Writes one JSON object to `--out` (date, machine, versions, command line,
git commit) and prints a short table.
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

LIBRARIES = ("keras-node", "tfp")
VARIANTS = ("none", "kinetic_energy", "jacobian_norm", "both")
GOAL_RATIO = 0.7

DIRECTIONS = {
    "keras-node": "data at t0=0 -> base N(0,I) at t1=1: log_prob solves "
                  "dz/dt = f(t, z) forward from the data",
    "tfp": "FFJORD's forward is base (t0=0) -> data (t1=1) with "
           "g(t, z) = -f(1 - t, z); TransformedDistribution.log_prob solves "
           "its inverse dz/ds = -g(1 - s, z) = f(s, z) from the data, the "
           "same ODE as ours",
}


def parse_args(argv=None):
    from examples.cnf import DATASETS
    from examples.options import check_ranges

    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("tfp", "regularisers"),
                        default=["tfp", "regularisers"])
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        default="two_moons")
    parser.add_argument("--iterations", type=int, default=500,
                        help="iterations per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2,
                        help="each model's first steps, left out of the "
                        "step time (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="rtol and atol (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--kinetic-energy", type=float, default=0.01)
    parser.add_argument("--jacobian-norm", type=float, default=0.01)
    parser.add_argument("--test-points", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("runs/benchmarks/cnf.json"))
    args = parser.parse_args(argv)
    check_ranges(parser, args,
                 positive=("iterations", "rounds", "batch_size", "units",
                           "depth", "test_points", "learning_rate", "tol",
                           "kinetic_energy", "jacobian_norm"),
                 non_negative=("warmup",))
    return args


def dynamics_pair(units, depth, seed, dim=2):
    """Two `TimeMLP`s with the same initial weights (the second's copied)."""
    import keras
    from examples.cnf import TimeMLP

    keras.utils.set_random_seed(seed)
    first, second = TimeMLP(units, depth), TimeMLP(units, depth)
    first.build((None, dim))
    second.build((None, dim))
    second.set_weights(first.get_weights())
    return first, second


def our_flow(dynamics, tol, seed, kinetic_energy=0.0, jacobian_norm=0.0,
             dim=2):
    from keras_node import ContinuousNormalizingFlow

    flow = ContinuousNormalizingFlow(
        dynamics, t0=0.0, t1=1.0, rtol=tol, atol=tol, trace="exact",
        kinetic_energy=kinetic_energy, jacobian_norm=jacobian_norm,
        seed=seed)
    flow.build((None, dim))
    return flow


class TFPFlow:
    """TFP's FFJORD on the same ODE as ours: `g(t, z) = -f(1 - t, z)`.

    `nfe_forward` holds the evaluations of the last solve (TFP's
    diagnostics; FFJORD itself drops them)."""

    def __init__(self, dynamics, tol, dim=2):
        import tensorflow as tf
        import tensorflow_probability as tfp

        self.dynamics = dynamics
        self.nfe_forward = tf.Variable(0.0, trainable=False)
        solver = tfp.math.ode.DormandPrince(rtol=tol, atol=tol)

        def solve(**kwargs):
            results = solver.solve(**kwargs)
            self.nfe_forward.assign(tf.cast(
                results.diagnostics.num_ode_fn_evaluations, tf.float32))
            return results

        def g(t, z):
            return -dynamics(z, 1.0 - t)

        self.bijector = tfp.bijectors.FFJORD(
            state_time_derivative_fn=g, ode_solve_fn=solve,
            trace_augmentation_fn=tfp.bijectors.ffjord.trace_jacobian_exact,
            initial_time=0.0, final_time=1.0)
        self.distribution = tfp.distributions.TransformedDistribution(
            tfp.distributions.MultivariateNormalDiag(loc=tf.zeros(dim)),
            self.bijector)

    @property
    def trainable_variables(self):
        return self.dynamics.trainable_variables

    def log_prob(self, x):
        return self.distribution.log_prob(x)


def log_prob_function(model):
    """A `tf.function` of `x` (any batch) giving `log p(x)` per example."""
    import tensorflow as tf

    call = model.log_prob

    @tf.function(input_signature=[tf.TensorSpec((None, 2), tf.float32)])
    def log_prob(x):
        return call(x)

    return log_prob


def per_point_log_prob(log_prob, x, batch_size=2500):
    import numpy as np

    return np.concatenate([log_prob(x[i:i + batch_size]).numpy()
                           for i in range(0, len(x), batch_size)])


def train_step_function(model, learning_rate):
    """The one hand-written step both libraries use: -mean log p plus any
    regularisers' losses (ours' `losses`), Adam. Returns (loss, nll)."""
    import keras
    import tensorflow as tf

    variables = list(model.trainable_variables)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)
    regularised = getattr(model, "losses", None) is not None

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            nll = -tf.reduce_mean(model.log_prob(x))
            loss = nll
            for term in (model.losses if regularised else ()):
                loss = loss + tf.cast(term, loss.dtype)
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss, nll

    return step


class Trainee:
    """A model, its step, and everything recorded of its training."""

    def __init__(self, model, learning_rate, counts):
        self.model = model
        self.step = train_step_function(model, learning_rate)
        self.log_prob = log_prob_function(model)
        self.counts = counts  # () -> (forward, backward or None)
        self.step_s, self.loss, self.nll = [], [], []
        self.nfe_forward, self.nfe_backward = [], []
        self.iterations = 0

    def train(self, batches):
        for x in batches:
            started = time.perf_counter()
            loss, nll = self.step(x)
            loss, nll = float(loss), float(nll)  # waits for the step
            self.step_s.append(time.perf_counter() - started)
            if not (math.isfinite(loss) and math.isfinite(nll)):
                raise FloatingPointError(
                    f"non-finite loss at iteration {self.iterations + 1}")
            self.loss.append(loss)
            self.nll.append(nll)
            forward, backward = self.counts()
            self.nfe_forward.append(forward)
            self.nfe_backward.append(backward)
            self.iterations += 1

    def summary(self, warmup, last=20):
        import numpy as np

        timed = self.step_s[warmup:] or self.step_s
        mean = lambda xs: (None if not xs or xs[0] is None
                           else float(np.mean(xs)))
        return {
            "iterations": self.iterations,
            "median_step_s": float(np.median(timed)),
            "min_step_s": float(np.min(timed)),
            "timed_steps": len(timed),
            "train_s": float(np.sum(self.step_s)),
            "train_s_after_warmup": float(np.sum(self.step_s[warmup:])),
            "loss_last_20": mean(self.loss[-last:]),
            "train_nll_last_20": mean(self.nll[-last:]),
            "nfe_forward_last_20": mean(self.nfe_forward[-last:]),
            "nfe_backward_last_20": mean(self.nfe_backward[-last:]),
            "nfe_forward_mean": mean(self.nfe_forward),
        }


def our_counts(flow):
    return lambda: (float(flow.ode.num_forward_evals),
                    float(flow.ode.num_backward_evals))


def batches(x, batch_size, start, count):
    import tensorflow as tf

    return [tf.constant(x[(start + i) * batch_size:
                          (start + i + 1) * batch_size])
            for i in range(count)]


def held_out(trainee, test):
    import numpy as np

    log_prob = per_point_log_prob(trainee.log_prob, test)
    return float(-np.mean(log_prob)), log_prob


def part_tfp(args, train_x, test):
    import numpy as np

    ours_dynamics, tfp_dynamics = dynamics_pair(args.units, args.depth,
                                                args.seed)
    ours = our_flow(ours_dynamics, args.tol, args.seed)
    tfp_flow = TFPFlow(tfp_dynamics, args.tol)
    trainees = {
        "keras-node": Trainee(ours, args.learning_rate, our_counts(ours)),
        "tfp": Trainee(tfp_flow, args.learning_rate,
                       lambda: (float(tfp_flow.nfe_forward.numpy()), None)),
    }
    # The same problem at the start: the same density, up to the solvers'
    # error at this tolerance.
    check = test[:256]
    initial = {name: per_point_log_prob(t.log_prob, check)
               for name, t in trainees.items()}
    initial_diff = float(np.max(np.abs(initial["keras-node"]
                                       - initial["tfp"])))
    print(f"initial log_prob: max |ours - TFP| over {len(check)} points "
          f"{initial_diff:.2e}", flush=True)

    rounds, log_probs = [], {}
    for r in range(args.rounds):
        data = batches(train_x, args.batch_size, r * args.iterations,
                       args.iterations)
        record = {"round": r + 1}
        for name, trainee in trainees.items():
            started = time.perf_counter()
            trainee.train(data)
            nll, log_probs[name] = held_out(trainee, test)
            record[name] = {"held_out_nll": nll,
                            "seconds": time.perf_counter() - started,
                            "median_step_s": float(np.median(
                                trainee.step_s[-args.iterations:]))}
            print(f"round {r + 1}, {name}: held-out NLL {nll:.4f}, median "
                  f"step {record[name]['median_step_s']:.4f} s", flush=True)
        rounds.append(record)

    libraries = {}
    for name, trainee in trainees.items():
        nll = float(-np.mean(log_probs[name]))  # after the last round
        libraries[name] = {**trainee.summary(args.warmup),
                           "held_out_nll": nll,
                           "initial_held_out_nll_256": float(
                               -np.mean(initial[name])),
                           "direction": DIRECTIONS[name]}
    libraries["tfp"]["nfe_note"] = (
        "forward: TFP's num_ode_fn_evaluations of the solve (augmented "
        "state); backward not reported by TFP")
    # ours' NLL - TFP's
    difference = log_probs["tfp"] - log_probs["keras-node"]
    delta = float(np.mean(difference))
    se = float(np.std(difference, ddof=1) / math.sqrt(len(difference)))
    ratio = (libraries["keras-node"]["median_step_s"]
             / libraries["tfp"]["median_step_s"])
    nll_ok = delta <= 2 * se
    return {
        "libraries": libraries,
        "rounds": rounds,
        "initial_log_prob_max_abs_diff": initial_diff,
        "step_time_ratio": ratio,
        "nll_difference": delta,
        "nll_difference_se": se,
        "goal": {
            "statement": f"the same held-out NLL within noise at no more "
                         f"than {GOAL_RATIO}x TFP's step time",
            "nll_rule": "ours' NLL - TFP's <= 2 x the paired standard "
                        "error over the test points (one seed: training "
                        "noise across seeds is not measured)",
            "nll_met": bool(nll_ok),
            "time_met": bool(ratio <= GOAL_RATIO),
            "met": bool(nll_ok and ratio <= GOAL_RATIO),
        },
        "gradient": {"keras-node": "adjoint, seminorm (the default)",
                     "tfp": "DormandPrince's adjoint (its default)"},
    }


def part_regularisers(args, train_x, test):
    weights = {"none": (0.0, 0.0),
               "kinetic_energy": (args.kinetic_energy, 0.0),
               "jacobian_norm": (0.0, args.jacobian_norm),
               "both": (args.kinetic_energy, args.jacobian_norm)}
    trainees = {}
    for name, (kinetic, jacobian) in weights.items():
        dynamics, _ = dynamics_pair(args.units, args.depth, args.seed)
        flow = our_flow(dynamics, args.tol, args.seed, kinetic, jacobian)
        trainees[name] = Trainee(flow, args.learning_rate, our_counts(flow))
    for r in range(args.rounds):
        data = batches(train_x, args.batch_size, r * args.iterations,
                       args.iterations)
        for name, trainee in trainees.items():
            trainee.train(data)
            print(f"round {r + 1}, {name}: forward/backward NFE "
                  f"{trainee.nfe_forward[-1]:.0f}/"
                  f"{trainee.nfe_backward[-1]:.0f}", flush=True)
    variants = {}
    for name, trainee in trainees.items():
        nll, _ = held_out(trainee, test)
        kinetic, jacobian = weights[name]
        variants[name] = {"kinetic_energy": kinetic,
                          "jacobian_norm": jacobian,
                          **trainee.summary(args.warmup),
                          "held_out_nll": nll}
    return {"variants": variants,
            "note": "loss includes the penalty; held_out_nll is "
                    "-mean(log_prob) alone"}


def metadata(argv):
    from benchmarks.machine import provenance
    from benchmarks.train_step import machine

    return {**provenance(), "machine": machine(),
            "command": " ".join([sys.executable, "-m", "benchmarks.cnf",
                                 *argv])}


def print_table(result):
    if "tfp" in result:
        part = result["tfp"]
        print(f"\n{result['dataset']}, "
              f"{part['libraries']['tfp']['iterations']}"
              f" iterations, batch {result['args']['batch_size']}, tol "
              f"{result['args']['tol']}")
        print(f"{'library':<12} {'median step':>12} {'NFE fwd':>8} "
              f"{'NFE bwd':>8} {'held-out NLL':>13}")
        for name, row in part["libraries"].items():
            backward = row["nfe_backward_last_20"]
            print(f"{name:<12} {row['median_step_s']:>10.4f} s "
                  f"{row['nfe_forward_last_20']:>8.1f} "
                  f"{'-' if backward is None else f'{backward:.1f}':>8} "
                  f"{row['held_out_nll']:>13.4f}")
        goal = part["goal"]
        print(f"ours / TFP step time {part['step_time_ratio']:.3f} (goal <= "
              f"{GOAL_RATIO}: {'met' if goal['time_met'] else 'NOT met'}); "
              f"NLL ours - TFP {part['nll_difference']:+.4f} +- "
              f"{part['nll_difference_se']:.4f} ("
              f"{'within noise' if goal['nll_met'] else 'worse'}); goal "
              f"{'MET' if goal['met'] else 'NOT MET'}")
    if "regularisers" in result:
        print(f"\n{'regulariser':<15} {'NFE fwd':>8} {'NFE bwd':>8} "
              f"{'held-out NLL':>13} {'train s':>8}")
        for name, row in result["regularisers"]["variants"].items():
            print(f"{name:<15} {row['nfe_forward_last_20']:>8.1f} "
                  f"{row['nfe_backward_last_20']:>8.1f} "
                  f"{row['held_out_nll']:>13.4f} {row['train_s']:>8.1f}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("benchmarks.cnf compares with TFP's FFJORD: run it "
                         "on the TensorFlow backend (KERAS_BACKEND="
                         "tensorflow).")
    import tensorflow as tf
    from examples.cnf import DATASETS

    tf.get_logger().setLevel("ERROR")  # TFP's deprecation notes, retracing
    data = DATASETS[args.dataset]
    total = args.rounds * args.iterations
    train_x = data(total * args.batch_size, args.seed)
    test = data(args.test_points, args.seed + 1)  # held out: another seed
    result = {"benchmark": "cnf", "dataset": args.dataset,
              "args": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                       for k, v in vars(args).items()},
              **metadata(argv)}
    started = time.perf_counter()
    if "tfp" in args.parts:
        result["tfp"] = part_tfp(args, train_x, test)
    if "regularisers" in args.parts:
        result["regularisers"] = part_regularisers(args, train_x, test)
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nWrote {args.out}.")
    return result


if __name__ == "__main__":
    main()
