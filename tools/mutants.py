"""Issue 46's mutation testing: mutants made by operators (not by hand) in every function changed since a base
commit, each run against only the tests that run its statement, in processes that import TensorFlow once.

    python3 tools/mutants.py map [TEST ...]     # the suite (or TESTs, updating the map) once, probed: ~7 min
    python3 tools/mutants.py run [--jobs 2] [--budget S] [--again [--children]] [FUNCTION ...]
    python3 tools/mutants.py report [EARLIER]   # per function (EARLIER: a results file, before each arrow)

Everything runs in copies of the working tree's tracked files under .mutants/ (a mutant that writes files cannot
touch the checkout); results go to .mutants/results.jsonl. A mutant swaps the `__code__` of the live function,
compiled from the mutated module in place, so every reference to it (`from vae_fashion import ...`, bound methods,
Keras' retracing of `train_step`) runs the mutant. The map also probes the Python processes the tests start (the
script, `python -c` runs); a mutant that survives in-process, or that only such processes reach, is written into
a copy of the tree, where a new pytest runs those tests. --budget S: no further test starts that would end after S
seconds of a mutant's tests, by its time on the original code (the mutant then counts as survived: a lower bound
on the kill rate); --again: only the last results' survivors and unreached; --children (with --again): their
in-process tests, which an earlier pass ran, are skipped, and the whole budget goes to the tests' child processes
(the two-device and resume runs). Why not mutmut or cosmic-ray, and the results: docs/RESULTS.md, "Mutation
testing".

Operators, applied to every statement of each function's body (its docstring and annotations excepted): a
comparison flipped (< <=, > >=, == !=, is / is not, in / not in), and <-> or, `not x` -> `x`, a number +1 and -1,
True <-> False, two adjacent positional arguments swapped, a statement dropped.
"""

import argparse
import ast
import collections
import contextlib
import copy
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = "91b76ab"  # issue 46: every function changed since this commit
SOURCES = {"vae_fashion": "vae_fashion.py", "sync_docs": "tools/sync_docs.py"}
WORK = Path(os.environ.get("MUTANTS_WORK", ROOT / ".mutants"))  # the copy's processes write to the checkout's
# one process, no cache or reordering; --tb=line: pytest formats no source (its ast.parse of a deep failure hit a
# CPython 3.11 SystemError in a worker)
PYTEST = ["-q", "-n", "0", "--tb=line", "-p", "no:cacheprovider", "-p", "no:randomly"]
MAP = WORK / "map.json"  # test -> the statements of scoped functions it runs, its seconds
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
# Survivors that behave exactly as the original: key -> why (docs/RESULTS.md lists them).
SWAPPED = "arguments of a symmetric function (max, min, logical and, PSNR's MSE) swapped"
EQUIVALENT = {
    "vae_fashion:setting_problem: return None -> if False: return None #2": "the last line: falling off returns None",
    "vae_fashion:supcon_loss: 1 -> 0 #4": "n_positive summed over the other axis of a symmetric matrix",
    "vae_fashion:supcon_loss: 1.0 -> 2.0 #2": "positives come in pairs: n_anchors is 0 (then the sum is 0) or >= 2",
    "vae_fashion:supcon_loss: 1000000000.0 -> 999999999.0": "the same float32, -1e9",
    "vae_fashion:supcon_loss: 1000000000.0 -> 1000000001.0": "the same float32, -1e9",
    "vae_fashion:supcon_loss: True -> False #2": "log-sum-exp by column: every anchor of a class has as many "
    "positives, so the mean over anchors is the same sum",
    "vae_fashion:supcon_loss: 1 -> 0 #2": "log-sum-exp by column: the mean over anchors is the same sum",
    "vae_fashion:supcon_loss: 1 -> 0 #5": "positives summed by column: the mean over anchors is the same sum",
    "vae_fashion:supcon_loss: ops.equal(labels[:, None], labels[None, :]) -> ops.equal(labels[None, :], "
    "labels[:, None])": SWAPPED,
    "vae_fashion:supcon_loss: ops.logical_and(ops.equal(labels[:, None], labels[None, :]), ops.logical_not(is_self)) "
    "-> ops.logical_and(ops.logical_not(is_self), ops.equal(labels[:, None], labels[None, :]))": SWAPPED,
    "vae_fashion:supcon_loss: ops.maximum(n_positive, 1.0) -> ops.maximum(1.0, n_positive)": SWAPPED,
    "vae_fashion:supcon_loss: ops.maximum(n_anchors, 1.0) -> ops.maximum(1.0, n_anchors)": SWAPPED,
    "vae_fashion:supcon_weight: ops.maximum(supcon, 1.0) -> ops.maximum(1.0, supcon)": SWAPPED,
    "vae_fashion:warmup_beta: warmup_epochs <= 0 -> warmup_epochs < 0": "warm-up 0: beta_max * min(1, inf) = beta_max",
    "vae_fashion:warmup_beta: 0 -> -1": "warm-up 0: beta_max * min(1, inf) = beta_max",
    "vae_fashion:warmup_beta: 0 -> 1": "warm-up 1: beta_max * min(1, epoch + 1) = beta_max",
    "vae_fashion:warmup_beta: if warmup_epochs <= 0: return ops.convert_to_tensor(beta_max, 'float32') -> if False: "
    "if warmup_epochs <= 0: return ops.convert_to_tensor(beta_max, 'float32')": "beta_max * min(1, inf) = beta_max",
    "vae_fashion:warmup_beta: return ops.convert_to_tensor(beta_max, 'float32') -> if False: return "
    "ops.convert_to_tensor(beta_max, 'float32')": "beta_max * min(1, inf) = beta_max",
    "vae_fashion:warmup_beta: ops.minimum(1.0, ops.cast(epoch + 1, 'float32') / warmup_epochs) -> "
    "ops.minimum(ops.cast(epoch + 1, 'float32') / warmup_epochs, 1.0)": SWAPPED,
    "vae_fashion:VAE.__init__: 1 -> 2": "FitSchedule sets the epoch length before the first step",
    "vae_fashion:build_vae: 1 -> 2": "the build call's batch size makes the same variables",
    "vae_fashion:build_vae: 1 -> 0": "the build call's batch size makes the same variables",
    "vae_fashion:image_quality: peak_signal_noise_ratio(r, i, data_range=1.0) -> "
    "peak_signal_noise_ratio(i, r, data_range=1.0)": SWAPPED,
    "vae_fashion:FitSchedule.on_train_begin: max(1, steps * self.params['epochs']) -> "
    "max(steps * self.params['epochs'], 1)": SWAPPED,
    "vae_fashion:FitSchedule.on_train_begin: 1 -> 0": "steps and epochs are >= 1 here: max(0, n) = max(1, n)",
    "vae_fashion:representation_quality: 1000 -> 1001": "lbfgs converges in far fewer iterations (else it warns)",
    "vae_fashion:representation_quality: 1000 -> 999": "lbfgs converges in far fewer iterations (else it warns)",
    "vae_fashion:representation_quality: min(10, len(z_train)) -> min(len(z_train), 10)": SWAPPED,
    "vae_fashion:representation_quality: 1 -> 2": "kNN's n_jobs -2 instead of -1: how many processes, not the result",
    "vae_fashion:VAE.encode: 0 -> -1": "Keras' progress bar prints for verbose 1 and 2 only",
    "vae_fashion:parse_idx: len(data) < expected -> len(data) <= expected": "inside `len(data) != expected`: "
    "never equal",
    "vae_fashion:TrainingTimeEstimate.on_epoch_end: 0 -> 1": "steps unknown: 0 or 1, both under 2, print nothing",
    "vae_fashion:TrainingTimeEstimate.on_epoch_end: 0 -> -1": "steps unknown: 0 or -1, both under 2, print nothing",
    "vae_fashion:image_quality: zip(ref, img) -> zip(img, ref)": "PSNR (with data_range) and SSIM are symmetric, "
    "bit for bit",
    "vae_fashion:image_quality: zip(ref, img) -> zip(img, ref) #2": "SSIM is symmetric, bit for bit",
    "vae_fashion:image_quality: structural_similarity(r, i, data_range=1.0) -> "
    "structural_similarity(i, r, data_range=1.0)": "SSIM is symmetric, bit for bit",
    "vae_fashion:classical_references: image_quality(clean[subset], output) -> "
    "image_quality(output, clean[subset])": "image_quality is symmetric (MSE, PSNR with data_range, SSIM)",
    "vae_fashion:classical_references: 0 -> -1": "the channel axis has one entry: index 0 is index -1",
    "vae_fashion:plot_images: 0 -> -1": "the channel axis has one entry: index 0 is index -1",
    "vae_fashion:draw_generated_samples: 0 -> -1": "one file a figure: paths[0] is paths[-1]",
    "vae_fashion:draw_class_conditional: 0 -> -1": "one file a figure: paths[0] is paths[-1]",
    "vae_fashion:draw_per_class_psnr: max(max(vae), max(noisy)) -> max(max(noisy), max(vae))": SWAPPED,
    "vae_fashion:classical_references: max(config.noise_factor, 0.001) -> max(0.001, config.noise_factor)": SWAPPED,
    "vae_fashion:denoise_tv: 0 -> -1": "the channel axis has one entry: index 0 is index -1",
    "vae_fashion:class_mixtures: min(len(codes), size) -> min(size, len(codes))": SWAPPED,
    "vae_fashion:class_mixtures: min(components, most) -> min(most, components)": SWAPPED,
    "vae_fashion:class_mixtures: max(1, min(components, most)) -> max(min(components, most), 1)": SWAPPED,
    "vae_fashion:project_tsne: min(30.0, max(2.0, (len(z) - 1) / 3.0)) -> "
    "min(max(2.0, (len(z) - 1) / 3.0), 30.0)": SWAPPED,
    "vae_fashion:project_tsne: max(2.0, (len(z) - 1) / 3.0) -> max((len(z) - 1) / 3.0, 2.0)": SWAPPED,
    "vae_fashion:generation_quality: min(len(data.x_test), len(data.x_train)) -> "
    "min(len(data.x_train), len(data.x_test))": SWAPPED,
    **{f"vae_fashion:generation_quality: frechet_distance(sets['{name}'][0], reference) -> "
       f"frechet_distance(reference, sets['{name}'][0])": "the Fréchet distance is symmetric"
       for name in ("train", "reconstruction", "prior", "noisy", "trained_prior", "training_codes", "conditional")},
    **dict.fromkeys(("vae_fashion:latent_paths: 1 -> 2", "vae_fashion:latent_paths: 1 -> 2 #3",
                     "vae_fashion:analyse: 1 -> 2"), "reshape(-2, ...): numpy (1.26 and 2.4) infers any negative size"),
    "vae_fashion:supcon_loss: 1.0 -> 0.0": "an anchor without a positive: its 0/0 is dropped by where(), in the "
    "value and in the gradient (where's gradient selects, it does not multiply; checked: same loss and gradient)",
    **dict.fromkeys(("vae_fashion:draw_per_class_psnr: 0 -> -1 #2", "vae_fashion:draw_generation_quality: 0 -> -1 #3",
                     "vae_fashion:draw_noise_robustness: 0 -> -1 #3"), "one file a figure: paths[0] is paths[-1]"),
    **dict.fromkeys(("vae_fashion:draw_noise_robustness: 0 -> 1", "vae_fashion:draw_noise_robustness: 0 -> -1"),
                    "the title's image count: every row of noise_robustness's table counts the same subset"),
    "vae_fashion:refuse_unknown: 1 -> 2": "difflib gives its best match first: asking for two changes nothing",
    **dict.fromkeys(("vae_fashion:config_from_env: 60000 -> 59999", "vae_fashion:config_from_env: 60000 -> 60001"),
                    "expost_components is at most 1000: with train_samples unset the bound cannot bind at 60,000 ± 1"),
    "vae_fashion:read_fashion_csv: 1 -> 2 #5": "reshape(-2, ...): numpy (1.26 and 2.4) infers any negative size",
    **dict.fromkeys(("vae_fashion:DistributedVAE.train_step: 0 -> 1 #2",
                     "vae_fashion:DistributedVAE.train_step: 0 -> -1 #2"),
                    "every example of a batch carries the batch's step key (make_train_dataset fills it)"),
    "vae_fashion:DistributedVAE.supcon_term: 0 -> -1 #2": "the labels are 1-D: all_gather on axis -1 is on axis 0",
    "vae_fashion:VAE.fit: 1 -> 0": "FitSchedule acts in on_train_begin, FitPrior in on_epoch_begin: their order in the "
    "list changes nothing",
    **dict.fromkeys(("vae_fashion:TrainingTimeEstimate.__init__: super().__init__() -> if False: super().__init__()",
                     "vae_fashion:EpochHistoryLog.__init__: super().__init__() -> if False: super().__init__()"),
                    "Keras' fit sets params and model on every callback before any hook; Callback.__init__ only sets "
                    "them to None (Keras 3.8 and 3.15)"),
    "vae_fashion:EpochHistoryLog.on_epoch_end: logs = logs or {} -> if False: logs = logs or {}": "Keras' fit always "
    "passes on_epoch_end a dict of logs",
    "vae_fashion:EpochHistoryLog.on_epoch_end: 1 -> 0 #2": "HISTORY_COLUMNS[0] is 'epoch', which is never a key of "
    "Keras' logs",
    "vae_fashion:load_folder: return None -> if False: return None": "the function's last statement: it returns "
    "None either way",
    "vae_fashion:progress_verbosity: Path(f'/proc/{os.getppid()}/cmdline').read_bytes().replace(b'\\x00', b' ') -> "
    "Path(f'/proc/{os.getppid()}/cmdline').read_bytes().replace(b' ', b'\\x00')": "the command line is searched for "
    "single words (nbconvert, nbclient, papermill): NUL or space between the arguments changes nothing",
    "vae_fashion:Checkpoint.restore: 1 -> 0 #2": "no backup is ever written for epoch 0: the file check skips it too",
    **dict.fromkeys(("vae_fashion:open_checkpoint: 2 -> 1", "vae_fashion:open_checkpoint: 2 -> 3"),
                    "the fingerprint is only read back by json.loads: its indentation changes nothing"),
    "vae_fashion:VAE.__init__: 1 -> 2 #2": "steps_per_epoch before any fit: FitSchedule sets it before fit's first "
    "step, and at step 0 the epoch is 0 // 1 == 0 // 2",
    "vae_fashion:classical_references: 0.001 -> -0.999": "noise_factor 0: non-local means at sigma 0 and at the "
    "1e-3 floor both return the input (to 1e-16, measured): the floor only keeps skimage's arguments positive",
    **dict.fromkeys(("vae_fashion:generation_quality: 0 -> -1 #2", "vae_fashion:generation_quality: 0 -> -1 #3"),
                    "predict's and evaluate's verbose -1 for 0: Keras prints their progress for 1 and 2 only"),
    **dict.fromkeys(("vae_fashion:generation_quality: len(features) > 1 -> len(features) >= 1",
                     "vae_fashion:generation_quality: theirs.sum() > 1 -> theirs.sum() >= 1",
                     "vae_fashion:generation_quality: 1 -> 0 #9", "vae_fashion:generation_quality: 1 -> 0 #10"),
                    "a class's feature sets hold as many rows as its test images, or none (no class mixture): "
                    "one guard alone decides, and a guard of >= 1 meets the other's > 1"),
    "vae_fashion:read_fashion_csv: path = Path(path) -> if False: path = Path(path)": "pandas reads a path given "
    "as text, and the messages show it alike",
    "vae_fashion:train_vae: first_epoch < config.epochs -> first_epoch <= config.epochs": "every epoch backed up, "
    "none trained: fit from initial_epoch = epochs runs no epoch (Keras' loop is empty) and its callbacks change "
    "nothing",
    "vae_fashion:DistributedVAE.train_step: True -> False": "training=False: no layer of the model acts otherwise "
    "in training (no dropout, no batch normalisation; the posterior noise is passed in)",
    "vae_fashion:DistributedVAE.supcon_term: recon = context.all_reduce(tf.distribute.ReduceOp.MEAN, recon) -> "
    "if False: recon = context.all_reduce(tf.distribute.ReduceOp.MEAN, recon)": "each replica weighs the global "
    "batch's SupCon by its own recon: the weight is linear in recon and constant in the gradient, so the summed "
    "loss and the summed gradient see the mean over replicas either way (all_gather's gradient sums every "
    "replica's); measured: two devices still give the one-device loss and gradient (test_devices.py)",
    "vae_fashion:keyed_normal: 1 -> 2": "one device drawing two replicas' rows keeps the first: stateless_normal's "
    "first values do not depend on the shape (tests/test_devices.py pins them)",
}


def functions(tree):
    """Module-level functions and methods: qualname -> node."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield f"{node.name}.{item.name}", item


def changed_functions(path: str, root: Path = ROOT) -> list[str]:
    """The functions of `path` whose text differs from BASE's (or that BASE lacks), in file order."""
    source = (root / path).read_text(encoding="utf-8")
    old = subprocess.run(["git", "show", f"{BASE}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    def texts(source):  # the lines of each function (ast.get_source_segment splits the file again each call)
        lines = source.splitlines()
        return {name: lines[node.lineno - 1:node.end_lineno] for name, node in functions(ast.parse(source))}
    before = texts(old)
    return [name for name, text in texts(source).items() if before.get(name) != text]


def _is_docstring(statement) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(
        statement.value.value, str)


def sites(function: ast.FunctionDef) -> list:
    """Every mutation of the function's body, in a fixed order: (kind, line, apply) where line is the innermost
    statement holding it (a test reaches the mutant when it runs that statement) and apply() mutates the tree in
    place and returns (before, after) as text."""
    found = []

    def replace(parent, field, index, new):
        def apply():
            old = getattr(parent, field) if index is None else getattr(parent, field)[index]
            if index is None:
                setattr(parent, field, new)
            else:
                getattr(parent, field)[index] = new
            return ast.unparse(old), ast.unparse(new)
        return apply

    def visit(node, line):
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "type_comment") or node is function and field != "body":
                continue
            children = value if isinstance(value, list) else [value]
            for index, child in enumerate(children):
                if not isinstance(child, ast.AST):
                    continue
                at = index if isinstance(value, list) else None
                if isinstance(child, ast.stmt) and not isinstance(child, (ast.Pass, ast.Global, ast.Nonlocal)) \
                        and not _is_docstring(child):
                    # `if False:` keeps the names the statement used, so a closure's cells still match.
                    test = ast.copy_location(ast.Constant(False), child)
                    dropped = ast.copy_location(ast.If(test, [child], []), child)
                    found.append(("statement dropped", child.lineno, replace(node, field, at, dropped)))
                child_line = child.lineno if isinstance(child, ast.stmt) else line
                mutations(node, field, at, child, child_line)
                visit(child, child_line)

    def mutations(parent, field, at, node, line):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                new = copy.copy(node)
                new.ops = [*node.ops[:i], COMPARE[type(op)](), *node.ops[i + 1:]]
                found.append(("comparison", line, replace(parent, field, at, new)))
        elif isinstance(node, ast.BoolOp):
            new = ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
            found.append(("and/or", line, replace(parent, field, at, ast.copy_location(new, node))))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append(("not dropped", line, replace(parent, field, at, node.operand)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            new = ast.copy_location(ast.Constant(not node.value), node)
            found.append(("True/False", line, replace(parent, field, at, new)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            for step in (1, -1):
                new = ast.copy_location(ast.Constant(node.value + step), node)
                found.append(("number ±1", line, replace(parent, field, at, new)))
        elif isinstance(node, ast.Call):
            args = node.args
            for i in range(len(args) - 1):
                starred = any(isinstance(a, ast.Starred) for a in args[i:i + 2])
                if not starred and ast.dump(args[i]) != ast.dump(args[i + 1]):
                    new = copy.copy(node)
                    new.args = [*args[:i], args[i + 1], args[i], *args[i + 2:]]
                    found.append(("arguments swapped", line, replace(parent, field, at, new)))

    visit(function, function.lineno)
    return found


def mutated(tree, name: str, ordinal: int):
    """The module tree with one mutation, in a copy of the function (the rest shared, not copied):
    (tree, kind, line, (before, after))."""
    body, (owner, _, method) = list(tree.body), name.rpartition(".")
    for i, node in enumerate(body):
        if owner and isinstance(node, ast.ClassDef) and node.name == owner:
            body[i] = copy.copy(node)
            body[i].body = [copy.deepcopy(item) if isinstance(item, ast.FunctionDef) and item.name == method else item
                            for item in node.body]
        elif not owner and isinstance(node, ast.FunctionDef) and node.name == name:
            body[i] = copy.deepcopy(node)
    new = ast.Module(body, tree.type_ignores)
    kind, line, apply = sites(dict(functions(new))[name])[ordinal]
    return new, kind, line, apply()


def mutants(module: str, root: Path = ROOT) -> list[dict]:
    """Every mutant of the module's changed functions: its key, function, line and text."""
    tree = ast.parse((root / SOURCES[module]).read_text(encoding="utf-8"))
    out, seen = [], collections.Counter()
    for name in changed_functions(SOURCES[module], root):
        for ordinal in range(len(sites(dict(functions(tree))[name]))):
            _, kind, line, (before, after) = mutated(tree, name, ordinal)
            text = f"{' '.join(before.split())[:90]} -> {' '.join(after.split())[:90]}"
            key = f"{module}:{name}: {text}"
            seen[key] += 1
            key += f" #{seen[key]}" if seen[key] > 1 else ""
            out.append({"key": key, "module": module, "function": name, "ordinal": ordinal, "kind": kind, "line": line,
                        "text": text})
    return out


def code_of(code: types.CodeType, qualname: str):
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_qualname == qualname:
                return const
            if (found := code_of(const, qualname)) is not None:
                return found
    return None


def live_function(module, qualname: str):
    owner, name = module, qualname
    if "." in qualname:
        owner_name, name = qualname.split(".")
        owner = getattr(module, owner_name)
    attribute = inspect.getattr_static(owner, name)
    if isinstance(attribute, property):
        attribute = attribute.fget
    return inspect.unwrap(getattr(attribute, "__func__", attribute))


def compiled(module, tree, qualnames):
    """Compile the (mutated) module tree; the new code of each function in qualnames."""
    code = compile(tree, module.__file__, "exec")
    return {name: code_of(code, name) for name in qualnames}


# ---------------------------------------------------------------- the map: which tests reach which function
class MapPlugin:
    """Records, per test, the statements of scoped functions run during it and during the wider-scoped fixtures
    it uses, and its cost: its own seconds plus those fixtures' set-up (what running it alone takes)."""

    def __init__(self):
        self.hits, self.tests, self.fixtures, self.failed, self.fixture_seconds = set(), {}, [], set(), 0.0

    def hit(self, name):
        self.hits.add(name)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        outer, self.hits, start = self.hits, set(), time.perf_counter()
        if fixturedef.scope != "function":  # the child processes it starts count for every test that uses it
            os.environ["MUTANTS_FIXTURE"] = json.dumps([fixturedef.argname, request.node.nodeid])
        yield
        os.environ.pop("MUTANTS_FIXTURE", None)
        if fixturedef.scope != "function":
            seconds = time.perf_counter() - start
            self.fixtures.append((fixturedef.argname, request.node.nodeid, sorted(self.hits), seconds))
            self.fixture_seconds += seconds
        self.hits = outer | self.hits

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.hits, self.fixture_seconds, start = set(), 0.0, time.perf_counter()
        yield
        self.tests[item.nodeid] = {"reach": self.hits, "seconds": time.perf_counter() - start - self.fixture_seconds,
                                   "fixtures": list(item.fixturenames), "passed": item.nodeid not in self.failed}

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.add(report.nodeid)


def probed(module_name: str, root: Path):
    """The module's tree at root in which every statement of the scoped functions first calls
    _mutants_hit_("module:function:line"); the names of those functions."""
    tree = ast.parse((root / SOURCES[module_name]).read_text(encoding="utf-8"))
    names = changed_functions(SOURCES[module_name], root)
    for name, function in functions(tree):
        if name not in names:
            continue
        for node in ast.walk(function):
            for field in ("body", "orelse", "finalbody"):
                statements = getattr(node, field, None)
                if not isinstance(statements, list) or not statements or not isinstance(statements[0], ast.stmt):
                    continue
                probes = []
                for statement in statements:
                    if not _is_docstring(statement):
                        probe = ast.parse(f"_mutants_hit_('{module_name}:{name}:{statement.lineno}')").body[0]
                        probes.append(ast.copy_location(probe, statement))
                    probes.append(statement)
                setattr(node, field, probes)
    return ast.fix_missing_locations(tree), names


def instrument(modules):
    """The scoped functions' code swapped for probed code, as a mutant's is."""
    plugin = MapPlugin()
    for module_name, module in modules.items():
        tree, names = probed(module_name, Path.cwd())
        module._mutants_hit_ = plugin.hit
        for name, code in compiled(module, tree, names).items():
            live_function(module, name).__code__ = code
    return plugin


def unconverted(module_name: str) -> None:
    """AutoGraph left off for the module: it converts tf.data's map functions and a strategy's train_step by
    re-reading their source from the file, which would run neither a probe nor a mutant. vae_fashion's functions
    branch on no tensor: unconverted, they trace alike."""
    from tensorflow.python.autograph.core import config as autograph  # no public switch for this

    autograph.CONVERSION_RULES = (autograph.DoNotConvert(module_name), *autograph.CONVERSION_RULES)


def load_modules():
    sys.path[:0] = [str(Path.cwd()), str(Path.cwd() / "tools"), str(Path.cwd() / "tests")]
    import sync_docs

    import vae_fashion

    unconverted("vae_fashion")
    return {"vae_fashion": vae_fashion, "sync_docs": sync_docs}


# ---------------------------------------------------------------- the map of the tests' child processes
# During `map`, a .pth file in site-packages makes every Python process that a test starts (PYTEST_CURRENT_TEST
# set, MUTANTS_CHILD naming this tree) record the scoped statements it runs, for that test: so a mutant that only
# a script run reaches still has its tests.
CHILD_HOOK = "mutants-child-hook.pth"


def child_probes():
    """Runs as a test's child process starts: vae_fashion and sync_docs, imported or run as the script, run
    probed code, which appends each scoped statement, when first run (a child may be killed), to
    .mutants/child-hits/<pid>.jsonl."""
    import importlib.machinery
    import threading

    if getattr(sys, "_mutants_child", False):  # site-packages may be processed twice
        return
    sys._mutants_child = True
    root, test = Path(os.environ["MUTANTS_CHILD"]), os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
    fixture = json.loads(os.environ.get("MUTANTS_FIXTURE", "null"))  # [name, scope] of a wider-scoped fixture
    files = {str(root / path): name for name, path in SOURCES.items()}
    (WORK / "child-hits").mkdir(exist_ok=True)
    out, seen = open(WORK / "child-hits" / f"{os.getpid()}.jsonl", "a", encoding="utf-8"), set()

    def hit(key):
        if key not in seen:
            seen.add(key)
            out.write(json.dumps({"test": test, "fixture": fixture, "key": key}) + "\n")
            out.flush()

    class ProbedLoader(importlib.machinery.SourceFileLoader):
        def exec_module(self, module):
            module._mutants_hit_ = hit
            if module.__name__ == "vae_fashion":
                unconverted("vae_fashion")
            tree, _ = probed(files[os.path.abspath(self.path)], root)
            exec(compile(tree, self.path, "exec"), module.__dict__)

    class ProbedFinder:
        @staticmethod
        def find_spec(fullname, path, target=None):
            spec = importlib.machinery.PathFinder.find_spec(fullname, path) if fullname in SOURCES else None
            if spec is None or os.path.abspath(spec.origin) not in files:
                return None
            spec.loader = ProbedLoader(fullname, spec.origin)
            return spec

    sys.meta_path.insert(0, ProbedFinder)
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if files.get(script) != "vae_fashion":
        return
    # The script itself runs as __main__, not imported: each scoped function, once its `def` has run, gets the
    # probed code, by a trace of the module's own lines until its last statement. Its libraries are imported
    # first, untraced (a traced TensorFlow import takes 10 times as long).
    main_tree, names = probed("vae_fashion", root)
    codes = compiled(types.SimpleNamespace(__file__=script), main_tree, names)
    body = ast.parse(Path(script).read_text(encoding="utf-8")).body
    for node in body:  # the environment it sets first, then its imports (but __future__'s and matplotlib's)
        if isinstance(node, ast.Expr):
            wanted = "environ.setdefault" in ast.unparse(node)
        else:
            wanted = isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0) and not any(
                name in ast.unparse(node) for name in ("__future__", "matplotlib"))
        if wanted:
            exec(compile(ast.Module([node], []), script, "exec"), {"os": os})
    unconverted("__main__")
    last = body[-1].lineno
    swapped = set()

    def module_lines(frame, event, arg):
        if event == "line":
            frame.f_globals["_mutants_hit_"] = hit
            for name, code in codes.items():
                owner, _, method = name.rpartition(".")
                holder = frame.f_globals.get(owner or name)
                if name not in swapped and holder is not None and (not owner or method in vars(holder)):
                    live_function(types.SimpleNamespace(**frame.f_globals), name).__code__ = code
                    swapped.add(name)
            if frame.f_lineno == last:
                sys.settrace(None)
                threading.settrace(None)
                return None
        return module_lines

    def calls(frame, event, arg):
        main = frame.f_code.co_name == "<module>" and os.path.abspath(frame.f_code.co_filename) == script
        return module_lines if main else None

    sys.settrace(calls)
    threading.settrace(calls)


def run_map(tests):
    plugin = instrument(load_modules())
    hook = Path(sysconfig.get_paths()["purelib"]) / CHILD_HOOK
    shutil.rmtree(WORK / "child-hits", ignore_errors=True)
    hook.write_text("import os, importlib.util as u; s = os.environ.get('MUTANTS_CHILD') and os.environ.get("
                    "'PYTEST_CURRENT_TEST') and u.spec_from_file_location('mutants_child', os.environ['MUTANTS_CHILD']"
                    " + '/tools/mutants.py'); m = s and u.module_from_spec(s); s and s.loader.exec_module(m); "
                    "s and m.child_probes()\n")
    os.environ["MUTANTS_CHILD"] = str(Path.cwd())
    try:
        code = pytest.main([*PYTEST, *(tests or ["tests"])], plugins=[plugin])
    finally:
        hook.unlink()
    children = collections.defaultdict(set)
    for path in (WORK / "child-hits").glob("*.jsonl"):
        for hit in map(json.loads, path.read_text().splitlines()):
            for nodeid, test in plugin.tests.items():  # a fixture's processes: for every test that uses it
                if nodeid == hit["test"] if hit["fixture"] is None else (
                        hit["fixture"][0] in test["fixtures"] and nodeid.startswith(hit["fixture"][1])):
                    children[nodeid].add(hit["key"])
    reach = json.loads(MAP.read_text()) if tests and MAP.exists() else {}  # a subset updates the map
    for nodeid, test in plugin.tests.items():
        hits, seconds = set(test["reach"]), test["seconds"]
        for argname, scope, fixture_hits, fixture_seconds in plugin.fixtures:
            if argname in test["fixtures"] and nodeid.startswith(scope):
                hits |= set(fixture_hits)
                seconds += fixture_seconds
        reach[nodeid] = {"reach": sorted(hits), "child_reach": sorted(children[nodeid]), "seconds": round(seconds, 3),
                         "passed": test["passed"]}
    MAP.write_text(json.dumps(reach, indent=1))
    print(f"pytest exit {code}; {len(reach)} tests mapped")


# ---------------------------------------------------------------- running the mutants
class Timeout(BaseException):
    pass


class RunPlugin:
    """Runs each mutant's reaching tests (fastest first, stopping at the first failure) in one pytest session;
    then, if it survived, the tests whose child processes run its statement, in a copy of the tree that holds it."""

    def __init__(self, work, modules, reach, out, budget, child_tree):
        self.work, self.modules, self.out, self.failed, self.budget = work, modules, out, None, budget
        self.reach = {test: {**v, "reach": set(v["reach"]), "child_reach": set(v.get("child_reach", ()))}
                      for test, v in reach.items()}
        self.killers = collections.defaultdict(collections.Counter)
        self.child_tree, self.finished, self.alarm = child_tree, False, None

    def pytest_runtest_logreport(self, report):
        if report.failed and self.failed is None:  # pytest reports the alarm's Timeout as the test's failure
            self.failed = self.alarm if "Timeout" in str(report.longrepr)[-3000:] else report.nodeid

    def pytest_runtestloop(self, session):
        items = {item.nodeid: item for item in session.items}
        trees = {name: ast.parse(Path(m.__file__).read_text(encoding="utf-8")) for name, m in self.modules.items()}
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout()))
        for mutant in self.work:
            name = f"{mutant['module']}:{mutant['function']}:{mutant['line']}"
            # among the tests that fit the budget, the cheapest per mutant of this function they killed first
            killers = self.killers[mutant["function"]]
            tests = sorted((t for t, v in self.reach.items() if name in v["reach"] and t in items),
                           key=lambda t: (self.reach[t]["seconds"] > self.budget,
                                          self.reach[t]["seconds"] / (1 + killers[t])))
            child_tests = sorted((t for t, v in self.reach.items() if name in v["child_reach"] and t in items),
                                 key=lambda t: self.reach[t]["seconds"])
            result = {**mutant, "tests": len(tests), "child_tests": len(child_tests)}
            if not tests and not child_tests:
                self.write({**result, "status": "no test reaches it"})
                continue
            Path(f"{self.out}.current").write_text(json.dumps(result))
            start, ran, error, self.failed = time.perf_counter(), 0, None, None
            if tests and child_tests and os.environ.get("MUTANTS_CHILDREN_ONLY"):  # --children
                tests = []
            if tests:
                tree = mutated(trees[mutant["module"]], mutant["function"], mutant["ordinal"])[0]
                ran = self.in_process(session, items, mutant, tree, tests)
            left = self.budget - (time.perf_counter() - start)
            if child_tests and not self.failed and (not tests or left > 0):
                # the cheapest that fit what is left of the budget (the first, if no test ran in-process)
                chosen = [t for k, t in enumerate(child_tests) if not tests and k == 0
                          or sum(self.reach[u]["seconds"] for u in child_tests[:k + 1]) <= left]
                ran, error = ran + len(chosen), self.in_children(mutant, chosen) if chosen else None
            if self.failed in items:
                self.killers[mutant["function"]][self.failed] += 1
            status = "error" if error else "killed" if self.failed else "survived"
            self.write({**result, "status": status, "by": error or self.failed, "ran": ran,
                        "seconds": round(time.perf_counter() - start, 1)})
        self.finished = True
        return True

    def in_process(self, session, items, mutant, tree, tests) -> int:
        """The mutated function's code swapped in, its tests run to the first failure (self.failed) or the
        budget; the number run."""
        module = self.modules[mutant["module"]]
        function = live_function(module, mutant["function"])
        original, start = function.__code__, time.perf_counter()
        function.__code__ = compiled(module, tree, [mutant["function"]])[mutant["function"]]  # errors: run()
        try:
            for ran, nodeid in enumerate(tests, 1):
                following = tests[ran] if ran < len(tests) else None
                # a test that takes far longer than it did on the original code (a mutant that turns a refusal
                # into a whole run, or loops) has caught the mutant
                limit = int(30 + 3 * self.reach[nodeid]["seconds"])
                self.alarm = f"{nodeid}: over {limit} s"
                signal.alarm(limit)
                session.config.hook.pytest_runtest_protocol(item=items[nodeid], nextitem=following and items[following])
                signal.alarm(0)
                # no test starts that would end past the budget, by its time on the original code
                if self.failed or following is None or time.perf_counter() - start + self.reach[following][
                        "seconds"] > self.budget:
                    break
        except Timeout:
            self.failed = self.alarm
        finally:
            signal.alarm(0)
            function.__code__ = original
            session._setupstate.teardown_exact(None)
            shutil.rmtree(session.config._tmp_path_factory.getbasetemp(), ignore_errors=True)
            session.config._tmp_path_factory._basetemp = None
        return ran

    def in_children(self, mutant, chosen) -> str | None:
        """The mutant written into this worker's copy of the tree, and a new pytest there running the chosen
        tests (they and all their processes see the mutant) to the first failure (self.failed); what went wrong,
        if pytest could not run them."""
        path = self.child_tree / SOURCES[mutant["module"]]
        original = path.read_text(encoding="utf-8")
        path.write_text(mutated_source(original, mutant), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MUTANTS_", "PYTEST_"))}
        limit = int(60 + 3 * sum(self.reach[t]["seconds"] for t in chosen))
        try:
            process = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST, "-x", *chosen], cwd=self.child_tree,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)  # a timeout stops the scripts it started too
            try:
                output = process.communicate(timeout=limit)[0]
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = process.returncode
            failed = [line.split()[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
            # exit 4 with a collection error: the test module's import of the mutated module failed
            if code in (1, 2, 3) or code == 4 and "ERROR collecting" in output:
                self.failed = f"{failed[0] if failed else f'pytest exit {code}'} (child processes)"
            elif code != 0:
                return f"pytest exit {code}: {output[-300:]}"
        except subprocess.TimeoutExpired:
            self.failed = f"timeout after {limit} s (child processes)"
        finally:
            path.write_text(original, encoding="utf-8")
        return None

    def write(self, result):
        with open(self.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
        Path(f"{self.out}.current").unlink(missing_ok=True)


def mutated_source(source: str, mutant: dict) -> str:
    """The module's text with the mutated function in place of the original (unparsed: its comments gone)."""
    tree = ast.parse(source)
    node = dict(functions(tree))[mutant["function"]]
    new = dict(functions(mutated(tree, mutant["function"], mutant["ordinal"])[0]))[mutant["function"]]
    lines = source.splitlines(keepends=True)
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    text = textwrap.indent(ast.unparse(new), " " * node.col_offset) + "\n"
    return "".join(lines[:first - 1]) + text + "".join(lines[node.end_lineno:])


def read_results(*paths) -> dict:
    """key -> result, the later files' results replacing the earlier's; missing files are empty."""
    return {r["key"]: r for path in paths if path.exists() for r in map(json.loads, path.read_text().splitlines())}


def work(shard: int, shards: int, out: str, budget: float):
    modules = load_modules()
    child_tree = copy_tree(f"tree-children-{shard}")  # where the mutants for child processes are written
    reach = json.loads(MAP.read_text())
    done = read_results(Path(out))
    todo = json.loads((WORK / "todo.json").read_text())[shard::shards]  # the mutants, as run() listed them
    plugin = RunPlugin([m for m in todo if m["key"] not in done], modules, reach, out, budget, child_tree)
    pytest.main([*PYTEST, "tests"], plugins=[plugin])
    return plugin.finished


def copy_tree(name: str) -> Path:
    tree = WORK / name
    shutil.rmtree(tree, ignore_errors=True)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    shutil.copy2(__file__, tree / "tools" / "mutants.py")  # this script, committed or not
    (tree / ".git").symlink_to(ROOT / ".git")  # changed_functions reads BASE from the history
    return tree


def run(jobs: int, budget: float, names, again: bool, children: bool = False):
    """`jobs` worker processes, each on its share of the mutants (of the functions named, or those that survived
    the last pass when `again`); a worker that dies in a mutant (a crash is a failure: killed) is started again on
    the rest. Results of a pass replace the earlier results of the same mutants."""
    newest = max(path.stat().st_mtime for path in [*ROOT.glob("tests/*.py"), *(ROOT / s for s in SOURCES.values())])
    if not MAP.exists() or MAP.stat().st_mtime < newest:
        raise SystemExit(f"{MAP} is older than the tests or the code: run `python3 tools/mutants.py map` first")
    tree, shards, processes = copy_tree("tree"), [WORK / f"results-{k}.jsonl" for k in range(jobs)], {}
    deaths = collections.Counter()
    earlier = read_results(WORK / "results.jsonl")
    survived = {key for key, r in earlier.items() if r["status"] in ("survived", "no test reaches it")}
    todo = [m for module in SOURCES for m in mutants(module) if (not names or m["function"] in names)
            and (not again or m["key"] in survived and m["key"] not in EQUIVALENT)]
    if not any(out.exists() for out in shards):  # else: resuming a pass that was stopped
        (WORK / "todo.json").write_text(json.dumps(todo))
    start = time.perf_counter()
    while not processes or any(p.poll() != 0 for p in processes.values()):
        for k, out in enumerate(shards):
            process = processes.get(k)
            if process is not None and (process.poll() is None or process.returncode == 0):
                continue
            current = Path(f"{out}.current")
            if process is not None and current.exists():
                print(f"worker {k} exited {process.returncode} in {current.read_text()}", flush=True)
                # a crash (a signal, an abort) is a failure; pytest's internal error (3) may be the tool's
                status = "error" if process.returncode == 3 else "killed"
                with open(out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**json.loads(current.read_text()), "status": status,
                                             "by": f"the worker exited {process.returncode}"}) + "\n")
            elif process is not None:
                deaths[k] += 1
                if deaths[k] > 3:
                    raise SystemExit(f"worker {k} keeps exiting {process.returncode} outside any mutant: see "
                                     f"{WORK / f'worker-{k}.log'}")
            command = [sys.executable, "tools/mutants.py", "work", str(k), str(jobs), str(out), str(budget)]
            processes[k] = subprocess.Popen(command, cwd=tree, stdout=open(WORK / f"worker-{k}.log", "a"),
                                            stderr=subprocess.STDOUT, env={**os.environ, "MUTANTS_WORK": str(WORK),
                                                                           **({"MUTANTS_CHILDREN_ONLY": "1"}
                                                                              if children else {})})
        time.sleep(5)
    earlier.update(read_results(*shards))
    for out in shards:
        out.unlink(missing_ok=True)
    (WORK / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier.values()))
    print(f"{len(todo)} mutants in {time.perf_counter() - start:.0f} s with {jobs} workers")


def report(before: str | None = None):
    """Per function: mutants, killed, equivalent, survived, not reached (with an earlier pass's figures before
    each arrow, given its results file); the kill rate; every survivor but the equivalent."""
    # the last pass's results, then those of a pass still running or stopped
    results = read_results(WORK / "results.jsonl", *sorted(WORK.glob("results-*.jsonl")))
    tables = []
    for found in ([read_results(Path(before))] if before else []) + [results]:
        table = collections.defaultdict(collections.Counter)
        for r in found.values():
            status = "equivalent" if r["status"] == "survived" and r["key"] in EQUIVALENT else r["status"]
            table[f"`{r['function']}`" if r["module"] == "vae_fashion" else f"`{r['module']}.{r['function']}`"][
                status] += 1
        table["**all**"] = sum(table.values(), collections.Counter())
        tables.append(table)
    columns = ["killed", "equivalent", "survived", "no test reaches it"] + ["error"] * any(
        t["**all**"]["error"] for t in tables)
    print("| function | mutants | " + " | ".join(columns) + " |\n" + "|---" * (2 + len(columns)) + "|")
    for name, counts in tables[-1].items():
        cells = [" → ".join(str(t[name][c]) for t in tables) if c != "equivalent" else str(counts[c])
                 for c in columns]
        print(f"| {name} | {sum(counts.values())} | " + " | ".join(cells) + " |")
    for table in tables:
        live = sum(table["**all**"].values()) - table["**all**"]["equivalent"]
        print(f"killed {table['**all**']['killed']} of {live} non-equivalent: "
              f"{table['**all**']['killed'] / max(live, 1):.1%}")
    for r in results.values():
        if r["status"] != "killed" and r["key"] not in EQUIVALENT:
            print(f"{r['status'].upper()} {r['key']}  (line {r['line']}; ran {r.get('ran')} of {r['tests']} tests"
                  f"{' and ' + str(r.get('child_tests')) + ' by child processes' if r.get('child_tests') else ''})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["map", "map-here", "run", "report", "work"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--again", action="store_true",
                        help="only the mutants that survived the last pass (or that no test reached)")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds of a mutant's tests after which no further test starts: it counts as survived")
    parser.add_argument("--children", action="store_true",
                        help="with --again: skip the in-process tests (an earlier pass ran them), run the child ones")
    args = parser.parse_intermixed_args()  # options before or after the function names
    if args.command == "map":
        WORK.mkdir(exist_ok=True)
        tree = copy_tree("tree-map")  # not the tree a pass may be running in
        sys.exit(subprocess.run([sys.executable, "tools/mutants.py", "map-here", *args.rest], cwd=tree,
                                env={**os.environ, "MUTANTS_WORK": str(WORK)}).returncode)
    elif args.command == "map-here":
        run_map(args.rest)
    elif args.command == "work":
        finished = work(int(args.rest[0]), int(args.rest[1]), args.rest[2], float(args.rest[3]))
        os._exit(0 if finished else 3)  # the failures pytest counts are the mutants'; an internal error is not
    elif args.command == "run":
        if args.children and not args.again:
            parser.error("--children runs again what an earlier pass left: use it with --again")
        run(args.jobs, args.budget, args.rest, args.again, args.children)
    else:
        report(*args.rest[:1])
