"""The MNIST example's command line: every option, checked."""

import argparse
import os
import pathlib

import keras

from examples.options import check_out_folder, check_ranges, seed_option
from keras_node.training import STRATEGIES

MANUAL_DIR_ENV = "KERAS_NODE_MNIST_DIR"
TENSORFLOW = keras.backend.backend() == "tensorflow"
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")


def parse_args(argv=None, description=None):
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--epochs", type=int, default=1, help="passes over the 54,000 "
        "training images (60,000 with --train-on-held-out) "
        "(default: %(default)s)")
    add("--batch-size", type=int, default=128,
        help="global mini-batch size (default: %(default)s)")
    add("--learning-rate", type=float, default=1e-2,
        help="Adam's peak learning rate; it warms up over the first 5%% of "
        "the steps and decays to zero on a cosine (default: %(default)s)")
    add("--weight-decay", type=float, default=0.0,
        help="Adam's decoupled weight decay: each step shrinks the weights "
        "by this times the learning rate (default: %(default)s, none)")
    add("--solver", default="dopri5",
        choices=["dopri5", "tsit5", "bosh3", "adaptive_heun", "euler",
                 "midpoint", "rk4"],
        help="the ODE solver; tsit5 is the DiffEqFlux tutorial's "
        "(default: %(default)s)")
    add("--num-steps", type=int, default=None,
        help="steps of a fixed-step solver (euler, midpoint, rk4) "
        "(default: 4)")
    add("--unroll", action="store_true",
        help="lay a fixed-step solver's steps out without a loop (a "
        "program that grows with the steps)")
    add("--gradient", default="adjoint", choices=["adjoint", "backprop"],
        help="adjoint: memory flat in the solver's steps; backprop: the "
        "exact gradient of the discrete solve (default: %(default)s)")
    add("--adjoint-norm", default=None, choices=["full", "seminorm"],
        help="error norm of the adjoint's backward solve, for adaptive "
        "solvers (default: seminorm)")
    add("--kinetic-energy", type=float, default=0.0,
        help="weight of the kinetic-energy regulariser (Finlay et al. "
        "2020), which keeps the dynamics straight and the solver's steps "
        "few (default: %(default)s, off)")
    add("--augment-dim", type=int, default=0,
        help="zero channels added to the ODE's 64 (an augmented neural "
        "ODE, Dupont et al. 2019) (default: %(default)s, none)")
    add("--ema", type=float, default=0.0,
        help="keep an exponential moving average of the weights with this "
        "momentum (e.g. 0.99) and end with the averaged weights; 0 turns it "
        "off (default: %(default)s)")
    add("--shift", type=int, default=0,
        help="augment: shift training images by up to this many pixels at "
        "random (default: %(default)s, no augmentation)")
    add("--rotate", type=float, default=0.0,
        help="augment: rotate training images by up to this many degrees "
        "either way at random (default: %(default)s, no rotation)")
    add("--train-on-held-out", action="store_true",
        help="train on all 60,000 training images, the held-out 10%% "
        "included: for a final run once the recipe is chosen on the held-out "
        "split; the accuracy printed during training is then the official "
        "test split's (nothing is chosen on it)")
    add("--max-steps", type=int, default=None,
        help="stop after this many iterations in all (default: the epochs')")
    add("--limit", type=int, default=None,
        help="use only the first N training images (90%% of them for "
        "training, 10%% held out) and N test images, for quick runs "
        "(default: all)")
    add("--out", type=pathlib.Path, default=pathlib.Path("runs/mnist"),
        help="output folder; a run with the folder of an interrupted run "
        "resumes it (default: %(default)s)")
    add("--seed", type=seed_option, default=0,
        help="seed of the split, the shuffling and the initial weights "
        "(default: %(default)s)")
    add("--manual-dir", type=pathlib.Path,
        default=os.environ.get(MANUAL_DIR_ENV),
        help="folder holding the four canonical MNIST .gz files, for use "
        f"without internet (default: ${MANUAL_DIR_ENV}, else download)")
    add("--data-dir", type=pathlib.Path, default=None,
        help="tensorflow-datasets cache (default: tfds' own, "
        "~/tensorflow_datasets)")
    add("--strategy", default="auto",
        choices=STRATEGIES,
        help="auto: MirroredStrategy over all GPUs if any, else the default "
        "strategy; mirrored: all GPUs (all logical CPUs without GPUs); "
        "multiworker: MultiWorkerMirroredStrategy from TF_CONFIG "
        "(default: %(default)s)")
    add("--eval-every", type=int, default=10,
        help="print train and test accuracy every N iterations "
        "(default: %(default)s, the tutorial's)")
    add("--train-eval-batches", type=int, default=100,
        help="training batches measured at each print "
        "(default: %(default)s, the tutorial's)")
    add("--checkpoint-every", type=int, default=50,
        help="save the resumable checkpoint every N iterations "
        "(default: %(default)s)")
    add("--tensorboard", type=pathlib.Path, default=None, metavar="DIR",
        help="log loss, accuracy and the evaluation counts to DIR for "
        "TensorBoard, every iteration (default: no logs)")
    add("--verbose", type=int, default=1, choices=[0, 1, 2],
        help="Keras' progress output: 0 none, 1 bar, 2 a line per epoch "
        "(default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_every", "train_eval_batches",
                 "checkpoint_every", "max_steps", "limit", "num_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive "
                         f"integer, got {value}")
    fixed = args.solver in FIXED_STEP_SOLVERS
    if args.num_steps is not None and not fixed:
        parser.error(f"--num-steps is for the fixed-step solvers "
                     f"({', '.join(FIXED_STEP_SOLVERS)}), not --solver "
                     f"{args.solver}")
    if args.unroll and not fixed:
        parser.error(f"--unroll is for the fixed-step solvers "
                     f"({', '.join(FIXED_STEP_SOLVERS)}), not --solver "
                     f"{args.solver}")
    if args.adjoint_norm is not None and (fixed or args.gradient != "adjoint"):
        parser.error("--adjoint-norm is for --gradient adjoint with an "
                     "adaptive solver (dopri5, tsit5, bosh3, "
                     "adaptive_heun)")
    if not TENSORFLOW and args.strategy not in ("auto", "default"):
        parser.error(f"--strategy {args.strategy} needs Keras' TensorFlow "
                     f"backend; on {keras.backend.backend()} use auto")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not 0 <= args.shift < 14:
        parser.error(f"--shift must be in [0, 13] pixels, got {args.shift}")
    if not 0 <= args.rotate <= 180:
        parser.error(f"--rotate must be in [0, 180] degrees, got "
                     f"{args.rotate}")
    check_ranges(parser, args, positive=("learning_rate",),
                 non_negative=("augment_dim", "weight_decay",
                               "kinetic_energy"))
    for option in ("out", "tensorboard", "data_dir"):
        if getattr(args, option) is not None:
            check_out_folder(parser, getattr(args, option),
                             "--" + option.replace("_", "-"))
    if args.manual_dir is not None:
        if not args.manual_dir.is_dir():
            parser.error(f"--manual-dir must be a folder holding the MNIST "
                         f"files; {args.manual_dir} is not a folder")
        from examples.mnist_data import check_manual_dir

        try:
            check_manual_dir(args.manual_dir)
        except (FileNotFoundError, ValueError) as error:  # missing, corrupt
            parser.error(str(error))
    return args


# What a run's checkpoint and model depend on: a resumed run with other
# values would mix two runs (a solver, a batch size, a data split).
RUN_OPTIONS = ("epochs", "batch_size", "learning_rate", "weight_decay",
               "solver", "num_steps", "unroll", "gradient", "adjoint_norm",
               "kinetic_energy", "augment_dim", "ema", "shift", "rotate",
               "train_on_held_out", "max_steps", "limit", "seed")
