"""The benchmarks' shared parts; their long runs are not tests."""

import datetime
import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import jax_only, tensorflow_only

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the peers' and the GPU scripts need besides this environment.
PEER_PACKAGES = {"torch", "torchdiffeq", "diffrax", "equinox", "optax", "jax"}
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "benchmarks").rglob("*.py")
    if path.name != "__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_imports_as_its_command_runs_it(name):
    """`python -m benchmarks.NAME` imports the module from the repository
    root, as each one's docstring says to run it."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name.split(".")[0] in PEER_PACKAGES:
            pytest.skip(f"{name} needs {error.name}")
        raise


def test_machine_records_the_cpu_and_the_onednn_setting(monkeypatch):
    from benchmarks.machine import describe

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    machine = describe()
    assert machine["tf_enable_onednn_opts"] == "1"
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert describe()["tf_enable_onednn_opts"] is None


def test_provenance_records_the_date_and_the_commit(monkeypatch, tmp_path):
    from benchmarks import machine

    record = machine.provenance()
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs(now - datetime.datetime.fromisoformat(record["date"])
               ) < datetime.timedelta(minutes=1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    assert record["git_commit"] == head
    assert isinstance(record["git_dirty"], bool)
    assert record["versions"] == machine.versions()
    monkeypatch.setattr(machine, "ROOT", tmp_path)  # not a git checkout
    record = machine.provenance()
    assert record["git_commit"] is None and record["git_dirty"] is None
    # A copy without .git (the GPU machines'): tools/device-wheels.sh's file.
    (tmp_path / ".whl").mkdir()
    (tmp_path / machine.COMMIT_FILE).write_text(
        '{"git_commit": "abc123", "git_dirty": false}\n')
    record = machine.provenance()
    assert record["git_commit"] == "abc123" and record["git_dirty"] is False


def test_versions_come_from_metadata_without_importing_the_packages():
    from benchmarks.machine import PACKAGES

    code = ("import json, sys; from benchmarks.machine import versions; "
            "print(json.dumps([versions(), sorted(sys.modules)]))")
    found, modules = json.loads(subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True,
        text=True, check=True).stdout)
    import keras
    import numpy

    assert found["keras"] == keras.__version__
    assert found["numpy"] == numpy.__version__
    assert found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(found) <= {"python", *PACKAGES}
    assert not {"keras", "numpy", "tensorflow", "jax"} & set(modules)


def test_device_wheels_stops_without_the_mnist_files(tmp_path):
    """Before it downloads anything, with a message that says why."""
    tools = tmp_path / "repo" / "tools"
    tools.mkdir(parents=True)
    (tools / "device-wheels.sh").write_text(
        (ROOT / "tools" / "device-wheels.sh").read_text())
    result = subprocess.run(["bash", str(tools / "device-wheels.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert ("no .mnist/train-images-idx3-ubyte.gz: put the four MNIST .gz "
            "files in ../shared/data/mnist" in result.stderr)
    assert not (tmp_path / "repo" / ".whl").exists()


def test_machine_records_the_vector_features(monkeypatch):
    from benchmarks import machine

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        flags = next(line for line in cpuinfo.read_text().splitlines()
                     if line.startswith("flags")).split(":")[1].split()
        features = machine.describe()["cpu_features"]
        assert features == [f for f in machine.VECTOR_FEATURES if f in flags]
    # A flag's prefix is not the flag ("avx512f" is not "avx512_fp16").
    monkeypatch.setattr(machine, "_cpuinfo",
                        lambda key: "avx2 avx512_fp16 fma")
    assert machine.cpu_features() == ["avx2"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda key: None)
    assert machine.cpu_features() is None


@tensorflow_only("benchmarks/train_step.py times the TensorFlow backend")
def test_train_step_runs_each_tolerance_in_a_child_process():
    """The documented command: the parent starts one child per tolerance
    (a fresh process each, for its own peak memory) and gathers their
    JSON. It reports what Keras ran: asked for XLA, Keras declines it for
    the adaptive solver's layer (which does not support it on TensorFlow)
    and the step runs as without the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--tolerances",
         "1e-2", "--steps", "1", "--warmup", "1", "--batch-size", "4",
         "--jit-compile"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    (run,) = report["runs"]
    assert run["tolerance"] == 1e-2 and run["nfe_forward"] > 0
    assert run["jit_compile"] is False
    assert run["median_step_s"] > 0 and report["machine"]["tensorflow"]
    assert report["steps"] == report["warmup"] == 1
    assert report["versions"]["tensorflow"] == report["machine"]["tensorflow"]


@tensorflow_only("benchmarks/train_step.py times the TensorFlow backend")
def test_train_step_shows_why_a_child_failed():
    # Only fixed-step solvers unroll: the child stops at once.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--tolerances",
         "1e-2", "--steps", "1", "--warmup", "1", "--unroll"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and not result.stdout
    assert "Only fixed-step solvers unroll" in result.stderr
    assert result.stderr.rstrip().endswith(
        "the run at tolerance 0.01 failed: see above.")


def test_train_step_solvers_are_the_packages(capsys):
    from benchmarks.train_step import SOLVERS, main

    from keras_node import solvers

    assert [solvers.get(name).name for name in SOLVERS] == SOLVERS
    assert set(SOLVERS) == {
        value.name for value in vars(solvers).values()
        if isinstance(value, type) and issubclass(value, solvers.Solver)
        and value.name}
    with pytest.raises(SystemExit):
        main(["--solver", "heun"])
    assert "argument --solver: invalid choice: 'heun'" in (
        capsys.readouterr().err)


@tensorflow_only("benchmarks/train_step.py times the TensorFlow backend")
def test_train_step_times_an_unrolled_fixed_step_solve_under_xla():
    from benchmarks.train_step import measure

    run = measure(None, steps=1, warmup=1, batch_size=4, jit_compile=True,
                  solver="rk4", gradient="backprop", num_steps=2,
                  unroll=True)
    assert run["solver"] == "RK4(num_steps=2, step_size=None, unroll=True)"
    assert run["jit_compile"] is True  # fixed-step solvers allow XLA
    assert run["nfe_forward"] == run["nfe_backward"] == 8  # 2 x 4


@jax_only("benchmarks/peers/keras_jax_step.py times the JAX backend")
def test_keras_jax_step_times_the_chosen_solve(capsys):
    from benchmarks.peers import keras_jax_step

    keras_jax_step.main(["--steps", "1", "--warmup", "1", "--batch-size",
                         "4", "--solver", "rk4", "--gradient", "backprop",
                         "--num-steps", "2", "--unroll"])
    run = json.loads(capsys.readouterr().out)
    assert run["solver"] == "RK4(num_steps=2, step_size=None, unroll=True)"
    assert run["nfe_forward"] == run["nfe_backward"] == 8
    assert len(run["losses"]) == 2 and run["median_step_s"] > 0


@pytest.mark.parametrize("gpu", [False, True])
def test_solver_table_gives_each_of_ours_its_peers_ratios(
        gpu, monkeypatch, tmp_path, capsys):
    """`--solver-table` times its table's configurations (on a GPU, ours on
    the JAX backend, with backprop for rk4 and tsit5), each of ours followed
    by its peers in every round, and divides the median over the rounds of
    each of ours by torchdiffeq's same solve's and diffrax's matching
    one's."""
    from benchmarks.peers import run

    table = run.GPU_SOLVER_TABLE if gpu else run.SOLVER_TABLE
    # A distinct step time for each configuration, scaled in each round by
    # factors whose median, mean, largest and smallest give other ratios.
    times = {run.label(*config): 0.1 * (index + 1)
             for index, config in enumerate(table)}
    factors = {"ours": (1.0, 2.0, 7.0), "peer": (4.0, 1.0, 5.0)}
    calls, names = [], []

    def run_once(library, steps, warmup, batch_size, gpu, solver, gradient):
        calls.append(run.command(library, steps, warmup, batch_size, gpu,
                                 solver, gradient))
        name = run.label(library, solver, gradient)
        rounds = names.count(name)
        names.append(name)
        side = "ours" if library == run.OURS else "peer"
        return {"median_step_s": times[name] * factors[side][rounds]}

    monkeypatch.setattr(run, "run_once", run_once)
    argv = ["--solver-table", "--rounds", "3", "--steps", "1", "--warmup",
            "1", "--json-out", str(tmp_path / "table.json")]
    run.main(argv + ["--gpu"] * gpu)
    result = json.loads((tmp_path / "table.json").read_text())
    summary = result["summary"]
    assert result["command"] == shlex.join(
        ["python", "-m", "benchmarks.peers.run", *argv] + ["--gpu"] * gpu)
    assert result["versions"]["python"] and result["rounds"] == 3
    # Every round runs the whole table in its order, where each of ours is
    # followed by its peers: torchdiffeq's same solve, diffrax's matching.
    assert names == list(times) * 3 and list(summary) == list(times)
    assert table[0][0] == run.OURS
    for library, solver, gradient in table:
        if library == run.OURS:
            block = (solver, gradient)
        elif library.startswith("diffrax-"):
            assert block[0] == solver
            assert run.DIFFRAX_ADJOINT[block[1]] == library.split("-")[1]
        else:
            assert block == (solver, gradient)
    ours = {(solver, gradient) for library, solver, gradient in table
            if library == run.OURS}
    assert {("rk4", "backprop"), ("tsit5", "backprop")} <= ours
    assert (("dopri5", "backprop") in ours) is not gpu
    ours_module = ("benchmarks.peers.keras_jax_step" if gpu
                   else "benchmarks.train_step")
    assert {argv[2] for argv in calls} == {
        ours_module, "benchmarks.peers.torchdiffeq_step",
        "benchmarks.peers.diffrax_step"}
    venvs = {"benchmarks.peers.torchdiffeq_step": ".venv-torch",
             "benchmarks.peers.diffrax_step": ".venv-jax"}
    for argv in calls:  # a GPU machine's one Python runs every library
        assert argv[0] == (sys.executable if gpu or argv[2] == ours_module
                           else str(ROOT / venvs[argv[2]] / "bin/python"))
        assert ("cuda" in argv) is (gpu and "torchdiffeq_step" in argv[2])
    for name, entry in summary.items():  # the medians: 2x and 4x
        median = 2.0 if name.startswith(run.OURS + " ") else 4.0
        assert entry["median_step_s"] == pytest.approx(times[name] * median)
        assert entry["rounds"] == 3
    for solver, gradient in ours:
        entry = summary[run.label(run.OURS, solver, gradient)]
        mine = times[run.label(run.OURS, solver, gradient)]
        diffrax = ("diffrax-" + {"adjoint": "backsolve",
                                 "backprop": "recursive"}[gradient]
                   + ("-stock" if gpu else "-slices"))
        for key, peer in [
                ("ratio_to_peer", run.label("torchdiffeq", solver, gradient)),
                ("ratio_to_diffrax", run.label(diffrax, solver))]:
            assert entry.get(key) == (None if peer not in times else
                                      pytest.approx(mine / times[peer] / 2))
    assert any("ratio_to_diffrax" in entry for entry in summary.values())
    assert "x diffrax" in capsys.readouterr().out  # the printed table


@tensorflow_only("benchmarks/profile_step.py times tf.functions")
def test_profile_step_times_the_chosen_solve_and_the_layers_around_it(
        tmp_path):
    trace = tmp_path / "trace"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--repeats", "1",
         "--batch-size", "4", "--solver", "rk4", "--gradient", "backprop",
         "--num-steps", "2", "--trace", str(trace)],
        cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    # The profiler's trace of the train steps, for TensorBoard.
    assert report["trace"] == str(trace) and report["repeats"] == 1
    assert list(trace.glob("plugins/profile/*/*.xplane.pb"))
    assert report["solver"] == \
        "RK4(num_steps=2, step_size=None, unroll=False)"
    assert report["gradient"] == "Backprop()"
    assert report["nfe_forward"] == report["nfe_backward"] == 8  # 2 x 4
    for key in ("dynamics_evaluation_s", "forward_backward_s",
                "without_ode_forward_backward_s", "train_step_s"):
        assert report[key] > 0, key


@tensorflow_only("benchmarks/peers/dynamics_cost.py times TensorFlow")
@pytest.mark.parametrize("part", ["dynamics", "ode", "around"])
def test_dynamics_cost_child_times_the_readme_model(part):
    solve = ["--solver", "rk4", "--gradient", "backprop", "--num-steps",
             "3"] if part == "ode" else []
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers.dynamics_cost", "--child",
         "tensorflow", "--repeats", "1", "--batch-size", "4", "--part",
         part, *solve], cwd=ROOT, capture_output=True, text=True, check=True)
    run = json.loads(result.stdout)
    assert run["library"] == "tensorflow"
    assert 0 < run["forward_s"] and 0 < run["forward_backward_s"]
    if part == "ode":  # the chosen solve: 3 RK4 steps of 4 evaluations
        assert run["nfe_forward"] == 12
    if part == "around":
        from benchmarks.peers.dynamics_cost import STAGES

        assert list(run["stages"]) == [name for name, *_ in STAGES]
        for name, stage in run["stages"].items():
            assert stage["forward_s"] > 0, name
            assert stage["forward_backward_s"] > 0, name


def test_dynamics_cost_takes_a_solve_for_the_ode_only(capsys):
    from benchmarks.peers import dynamics_cost

    with pytest.raises(SystemExit):
        dynamics_cost.main(["--part", "around", "--solver", "rk4"])
    assert ("--solver, --gradient and --num-steps apply to --part ode only"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        dynamics_cost.main(["--part", "ode", "--solver", "euler"])
    assert ("--solver: one of ['dopri5', 'tsit5', 'bosh3', 'rk4'] (those of "
            "torchdiffeq_step.py), not 'euler'" in capsys.readouterr().err)


def test_without_ode_is_the_rest_of_the_model():
    """The layers around the ODE, no more, no less: with the dynamics'
    weights they are the model's, and with the ODE put back (the same
    layers) they give the model's logits."""
    import keras

    from examples.mnist_common import build_model, ode_layer, without_ode

    model = build_model()
    ode = ode_layer(model)
    around = without_ode(model)
    images = np.random.default_rng(0).random((2, 28, 28, 1), "float32")
    logits = keras.ops.convert_to_numpy(around(images))
    assert logits.shape == (2, 10)
    assert {id(v) for v in around.trainable_variables} | {
        id(v) for v in ode.trainable_variables} == {
        id(v) for v in model.trainable_variables}
    assert not {id(v) for v in around.trainable_variables} & {
        id(v) for v in ode.trainable_variables}
    ode_at = model.layers.index(ode) - 1  # model.layers[0]: the input
    h = images
    for index, layer in enumerate(around.layers):
        h = layer(ode(h) if index == ode_at else h)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(h),
                               keras.ops.convert_to_numpy(model(images)),
                               rtol=1e-5, atol=1e-5)


def test_dynamics_cost_stages_are_the_layers_around_the_ode_in_order():
    from benchmarks.peers.dynamics_cost import STAGES
    from examples.mnist_common import build_model, without_ode

    layers = without_ode(build_model()).layers
    assert [layer for _, keras_layers, _ in STAGES
            for layer in layers[keras_layers]] == layers


def test_dynamics_cost_ratio_is_ours_over_torch_of_the_medians():
    from benchmarks.peers.dynamics_cost import STAGES, summarize

    # Medians 2 and 5; means 7/3 and 6, largest 4 and 9, smallest 1 and 4.
    runs = {"tensorflow": [{"forward_s": s, "forward_backward_s": 2 * s}
                           for s in (1.0, 4.0, 2.0)],
            "torch": [{"forward_s": s, "forward_backward_s": 8 * s}
                      for s in (4.0, 9.0, 5.0)]}
    summary = summarize(runs)
    assert summary["tensorflow"]["forward_s"] == 2.0
    assert summary["torch"]["forward_backward_s"] == 40.0
    assert summary["ratio"] == {"forward_s": 0.4, "forward_backward_s": 0.1}
    assert "stages" not in summary
    # --part around: each stage summarised the same way.
    for results in runs.values():
        for run in results:
            run["stages"] = {name: dict(run) for name, *_ in STAGES}
    summary = summarize(runs)
    assert summary["stages"][STAGES[0][0]]["ratio"] == summary["ratio"]
    assert len(summary["stages"]) == len(STAGES)


def test_dynamics_cost_stops_when_a_child_fails(monkeypatch):
    from benchmarks.peers import dynamics_cost

    monkeypatch.setattr(dynamics_cost, "run_json", lambda argv, what: None)
    with pytest.raises(SystemExit, match="^torch failed: see above.$"):
        dynamics_cost.run_child("torch", 1, 4, 2)


def test_save_at_benchmark_times_each_number_of_output_times(tmp_path):
    import keras

    from benchmarks import save_at

    out = tmp_path / "save_at.json"
    result = save_at.main(["--times", "1", "2", "--steps", "1",
                           "--json-out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [run["output_times"] for run in result["runs"]] == [1, 2]
    assert result["steps"] == 1 and result["versions"]["keras"]
    for run in result["runs"]:
        assert run["backend"] == keras.backend.backend()
        assert run["first_step_s"] > 0 and run["median_step_s"] > 0
        # Dormand-Prince: 2 + 6 per step, forward and back.
        assert (run["nfe_forward"] - 2) % 6 == 0
        assert run["nfe_backward"] >= 8


def test_eager_call_benchmark_times_both_models(tmp_path):
    import keras

    from benchmarks import eager_call

    out = tmp_path / "eager_call.json"
    result = eager_call.main(["--calls", "1", "--json-out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["backend"] == keras.backend.backend()
    assert sorted(result["models"]) == ["mlp", "mnist"]
    for run in result["models"].values():
        assert run["first_call_s"] > 0 and run["median_call_s"] > 0


def test_eager_call_benchmark_refuses_bad_options(capsys):
    from benchmarks import eager_call

    with pytest.raises(SystemExit):
        eager_call.main(["--calls", "0"])
    assert "--calls must be positive, got 0" in capsys.readouterr().err


def test_dropped_models_benchmark_reports_each_model(tmp_path):
    from benchmarks import dropped_models

    out = tmp_path / "dropped_models.json"
    result = dropped_models.main(["--models", "1", "--bodies", "predict",
                                  "--json-out", str(out)])
    assert json.loads(out.read_text()) == result
    assert list(result["left_behind"]) == ["predict"]
    assert sorted(result["left_behind"]["predict"]) == ["keras",
                                                        "neural_ode"]
    for run in result["left_behind"]["predict"].values():
        assert sorted(run) == ["objects_per_model", "rss_mib_per_model"]


def test_dropped_models_benchmark_refuses_bad_options(capsys):
    from benchmarks import dropped_models

    with pytest.raises(SystemExit):
        dropped_models.main(["--models", "0"])
    assert "--models must be positive, got 0" in capsys.readouterr().err


def test_work_precision_of_dopri5_is_scipys_rk45(tmp_path):
    from benchmarks import work_precision

    out = tmp_path / "work_precision.json"
    result = work_precision.main(["--problems", "mlp", "rotation", "--tols",
                                  "1e-4", "1e-6", "--json-out", str(out)])
    assert json.loads(out.read_text()) == result
    mlp, rotation = (result["problems"][name] for name in ("mlp",
                                                           "rotation"))
    # The same pair, error norm and controller as scipy's RK45, which ends
    # on t1 as ours does: the same evaluations and errors on the MLP.
    for ours, scipy_rk45 in zip(mlp["dopri5"], mlp["scipy_RK45"]):
        assert ours["nfe"] == scipy_rk45["nfe"]
        assert ours["error"] == pytest.approx(scipy_rk45["error"], rel=0.01)
    # Against the closed form, every solver's error falls with the
    # tolerance, for more evaluations.
    for name in work_precision.SOLVERS:
        loose, tight = rotation[name]
        assert tight["error"] < loose["error"] / 5, name
        assert tight["nfe"] > loose["nfe"], name


@pytest.mark.parametrize("argv, message", [
    (["--tols", "1e-3", "0"], "--tols must be positive, got 0.0"),
    (["--max-num-steps", "0"], "--max-num-steps must be positive, got 0"),
])
def test_work_precision_refuses_bad_options(argv, message, capsys):
    from benchmarks import work_precision

    with pytest.raises(SystemExit):
        work_precision.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--times", "0"], "--times must be positive integers"),
    (["--steps", "0"], "--steps must be positive"),
    (["--num-steps", "0"], "--num-steps must be positive"),
])
def test_save_at_benchmark_refuses_bad_options(argv, message, capsys):
    from benchmarks import save_at

    with pytest.raises(SystemExit):
        save_at.main(argv)
    assert message in capsys.readouterr().err


def test_save_at_benchmark_stops_at_a_failed_run(monkeypatch, tmp_path):
    # A child that failed (run_json printed its output, returned None)
    # stops the benchmark before anything is written.
    from benchmarks import save_at

    children = []
    monkeypatch.setattr(save_at, "run_json",
                        lambda command, name: children.append(name))
    out = tmp_path / "save_at.json"
    with pytest.raises(SystemExit, match=(
            "^the run with 3 output times failed: see above.$")):
        save_at.main(["--times", "3", "5", "--json-out", str(out)])
    assert children == ["3 output times"] and not out.exists()


def test_roofline_counts_the_readme_models_convolutions_by_hand():
    from benchmarks.peers.roofline import model_flops
    from examples.mnist_common import build_model, ode_layer

    model = build_model()
    counts = model_flops(model, ode_layer(model))
    # 2 x kernel size x output positions, per example.
    conv1 = 2 * (3 * 3 * 1 * 64) * 26 * 26
    conv2 = 2 * (4 * 4 * 64 * 64) * 13 * 13
    conv3 = 2 * (4 * 4 * 64 * 64) * 6 * 6
    dense = 2 * 64 * 10
    assert counts == {
        "around_forward": conv1 + conv2 + conv3 + dense,
        # The images need no gradient: the first convolution's kernel only.
        "around_backward": conv1 + 2 * (conv2 + conv3 + dense),
        "dynamics": 2 * 2 * (3 * 3 * 64 * 64) * 6 * 6}


def test_roofline_divides_each_step_by_its_count_and_the_peak():
    from benchmarks.peers.roofline import GOAL, rows, step_flops

    counts = {"around_forward": 10, "around_backward": 20, "dynamics": 1}
    summary = {
        "keras_node rk4 backprop": {"median_step_s": 2.0, "nfe_forward": 16,
                                    "nfe_backward": 16,
                                    "peer": "torchdiffeq rk4 backprop"},
        "torchdiffeq rk4 backprop": {"median_step_s": 4.0, "nfe_forward": 16,
                                     "nfe_backward": None},
        "keras_node dopri5 adjoint": {"median_step_s": 1.0,
                                      "nfe_forward": 14, "nfe_backward": 12,
                                      "peer": None},
        "diffrax-backsolve-slices dopri5": {
            "median_step_s": 3.0, "nfe_forward": 19, "nfe_backward": None},
        "diffrax-recursive-slices tsit5": {
            "median_step_s": 3.0, "nfe_forward": 19, "nfe_backward": None}}
    result = rows(summary, counts, batch_size=1e9, peak=100e9)
    # Backprop: each forward evaluation, then the product of those it
    # differentiates (twice the work); all of them where it is not counted.
    assert step_flops(counts, 1, "backprop", 14, 13) == 30 + 14 + 2 * 13
    assert step_flops(counts, 1, "backprop", 16, None) == 30 + 3 * 16
    # The adjoint: the backward evaluations run the dynamics and the product.
    assert step_flops(counts, 1, "adjoint", 14, 12) == 30 + 14 + 3 * 12
    ours = result["keras_node rk4 backprop"]
    assert ours["gflop"] == 78 and ours["gflops"] == 39
    assert ours["share_of_peak"] == pytest.approx(0.39)
    assert ours["goal_step_s"] == pytest.approx(GOAL * 4.0)
    assert ours["goal_share"] == pytest.approx(78 / (GOAL * 4.0) / 100)
    assert result["torchdiffeq rk4 backprop"]["gflops"] == 19.5
    assert result["keras_node dopri5 adjoint"]["gflops"] == 80
    assert "goal_share" not in result["keras_node dopri5 adjoint"]
    # diffrax's backsolve reports no backward evaluations; its recursive
    # checkpointing is backprop.
    assert result["diffrax-backsolve-slices dopri5"]["gflop"] is None
    assert result["diffrax-recursive-slices tsit5"]["gflop"] == 30 + 57


def test_roofline_peak_is_a_matrix_products_best_rate():
    import keras

    from benchmarks.peers.roofline import sgemm_rates

    rates = sgemm_rates(size=64, repeats=2)
    assert sorted(rates) == sorted(["numpy", keras.backend.backend()])
    assert all(1e6 < rate < 1e15 for rate in rates.values())


@pytest.mark.parametrize("text, message", [
    (None, "--table: cannot read"),
    ('{"benchmark": "peers"}', "is not the JSON of run.py --solver-table"),
    ('{"benchmark": "peers-solvers", "gpu": true}', "measured on a GPU"),
])
def test_roofline_refuses_a_table_it_cannot_use(text, message, tmp_path,
                                                capsys):
    from benchmarks.peers import roofline

    path = tmp_path / "table.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit):
        roofline.main(["--table", str(path)])
    assert message in capsys.readouterr().err


def test_roofline_refuses_a_bad_size(capsys):
    from benchmarks.peers import roofline

    with pytest.raises(SystemExit):
        roofline.main(["--table", "table.json", "--size", "0"])
    assert "--size must be at least 1" in capsys.readouterr().err


def test_gpu_device_script_refuses_an_unknown_part(tmp_path):
    """It stops before installing or running anything."""
    result = subprocess.run(
        ["bash", "benchmarks/gpu_device.sh", "solvers", "epochs"], cwd=ROOT,
        capture_output=True, text=True, env={"OUT": str(tmp_path / "out"),
                                             "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert ("unknown part 'epochs': use peers, epoch or solvers"
            in result.stderr)
    assert not (tmp_path / "out").exists()


def test_a_missing_peer_environment_is_named(tmp_path, monkeypatch):
    from benchmarks import spiral
    from benchmarks.peers import run

    missing = tmp_path / "python"
    with pytest.raises(SystemExit, match=(
            rf"^{re.escape(str(missing))} is missing: run `bash "
            r"benchmarks/peers/setup\.sh` first\.$")):
        run.run_json([str(missing)], "torchdiffeq")
    monkeypatch.setattr(spiral, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=(
            rf"^{re.escape(str(tmp_path))}/\.venv-torch/bin/python is "
            r"missing: run bash benchmarks/peers/setup\.sh first\.$")):
        spiral.run("torchdiffeq", 0, 1, "adjoint", "seminorm")


def test_the_latent_ode_runner_names_a_missing_peer_environment(
        tmp_path, monkeypatch):
    from benchmarks import latent_ode

    monkeypatch.setattr(latent_ode, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=(
            rf"^{re.escape(str(tmp_path))}/\.venv-torch/bin/python is "
            r"missing: run bash benchmarks/peers/setup\.sh first\.$")):
        latent_ode.run("torchdiffeq", 0, 1, "backprop")


def test_runs_against_torchdiffeq_alternate_over_the_seeds():
    from benchmarks.against_torchdiffeq import alternate

    calls = []

    def run(library, seed):
        calls.append((library, seed))
        return {"time": seed + (library == "torchdiffeq"), "other": 0}

    runs, median = alternate(run, [0, 1, 5], ["time"])
    assert calls == [("keras-node", 0), ("torchdiffeq", 0),
                     ("keras-node", 1), ("torchdiffeq", 1),
                     ("keras-node", 5), ("torchdiffeq", 5)]
    assert runs["torchdiffeq"][2] == {"seed": 5, "time": 6, "other": 0}
    assert median == {"keras-node": {"time": 1}, "torchdiffeq": {"time": 2}}


def test_diffrax_step_refuses_to_time_its_compiling_step(capsys):
    # Checked before JAX or diffrax is imported: no peer environment needed.
    from benchmarks.peers import diffrax_step

    with pytest.raises(SystemExit):
        diffrax_step.main(["--warmup", "0"])
    assert ("--warmup must be at least 1 (the first step compiles)"
            in capsys.readouterr().err)


@jax_only("the TensorFlow backend runs both")
def test_benchmarks_that_need_a_backend_say_so(capsys):
    from benchmarks import cnf
    from benchmarks.peers import keras_jax_step

    with pytest.raises(SystemExit, match=(
            r"^benchmarks\.cnf compares with TFP's FFJORD: run it on the "
            r"TensorFlow backend \(KERAS_BACKEND=tensorflow\)\.$")):
        cnf.main(["--iterations", "1"])
    with pytest.raises(SystemExit):
        keras_jax_step.main(["--warmup", "0"])
    assert ("--warmup must be at least 1 (the first step compiles)"
            in capsys.readouterr().err)


def test_serving_probe_follows_each_malformed_request_with_a_good_one():
    from benchmarks.serving_probe import PREDICT, bad_requests, client_requests

    good, bad = b"good", bad_requests()
    for clients in (8, 3):  # each client's turns, an even count of them too
        sent = [client_requests(index, 96, clients, good, bad)
                for index in range(clients)]
        assert sum(map(len, sent)) == 96
        for requests in sent:
            assert requests[0] == (PREDICT, good)
            for request, following in zip(requests, requests[1:]):
                assert (request[1] is good) is not (following[1] is good)
        malformed = [r for requests in sent for r in requests
                     if r[1] is not good]
        assert len(malformed) == 96 // 2
        assert {id(r) for r in malformed} == {id(r) for r in bad}


def test_figures_take_the_command_and_settings_from_the_runs(tmp_path):
    from benchmarks import figures

    result = {"benchmark": "peers", "command": "python -m "
              "benchmarks.peers.run --batch-size 32", "batch_size": 32,
              "tolerance": 1e-4, "solver": "tsit5", "gradient": "backprop",
              "date": "2026-01-02T03:04:05+00:00", "git_commit": "f" * 40,
              "machine": {"cpu": "a CPU", "cpu_count": 3},
              "versions": {"python": "3.0.0"}, "summary": {}}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(result))
    figures.collect_peers(path, tmp_path)
    record = json.loads((tmp_path / figures.PEERS).read_text())
    assert record["command"] == result["command"]
    assert (record["date"], record["commit"], record["machine"],
            record["versions"]) == ("2026-01-02", "fffffff", "a CPU, 3 CPUs",
                                    {"python": "3.0.0"})
    assert figures.peers_settings(result) == (
        "batch 32, tsit5 at rtol = atol = 0.0001, backprop")
    # An older run.py JSON: its solve was the default.
    assert figures.peers_settings({"batch_size": 128, "tolerance": 1e-3}) \
        == "batch 128, dopri5 at rtol = atol = 0.001, adjoint"
    options = {"epochs": 2, "batch_size": 128, "solver": "tsit5",
               "unroll": False, "train_on_held_out": True,
               "manual_dir": "mnist", "tensorboard": None}
    assert figures.mnist_command(options) == (
        "python -m examples.mnist --epochs 2 --solver tsit5 "
        "--train-on-held-out --manual-dir mnist")
