"""The package layout (docs/design.md, "Layers"): the public names, the import graph, module sizes.

The public names below were recorded from fastkd 0.1.0 before the package was split into
layers (issue 19); every one must stay importable from the same place.
"""
import ast
import importlib
import pathlib

import pytest

PUBLIC_NAMES = {
    "fastkd": [
        "LossParts", "TopKTeacher", "__version__", "ats_loss", "backends", "dist_loss", "dkd_loss",
        "fused_linear_kd_loss", "ipw_weights", "jsd_loss", "kd_loss", "mgd_loss", "nn", "reference",
        "reverse_kl_loss", "set_value_checks", "simkd_loss", "skew_kl_loss", "tvd_loss",
        "teacher_topk", "topk_from_logits",  # issue 21
        # issue 22
        "jeffreys_loss", "triangular_loss",
        "entropy_gated_kl_loss", "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss",
        # issue 23: across tokenizers
        "uld_loss", "ULDParts", "VocabMap", "MappedTeacher", "hybrid_uld_loss", "HybridParts",
        "align_tokens", "merge_aligned", "Alignment", "token_offsets",
    ],
    "fastkd.nn": [
        "ATSLoss", "CosineCurriculum", "DISTLoss", "DKDLoss", "FusedLinearKDLoss", "GradientReversal", "JSDLoss",
        "KDLoss", "LearnableTemperature", "MGDLoss", "ReverseKLLoss", "SimKD", "SkewKLLoss", "TVDLoss",
        "JeffreysLoss", "TriangularLoss", "ULDLoss", "HybridULDLoss",
        "EntropyGatedKLLoss", "AlphaDivergenceLoss", "ABDivergenceLoss", "RenyiLoss",
    ],
    "fastkd.functional": [
        "ats_loss", "dist_loss", "dkd_loss", "ipw_weights", "jsd_loss", "kd_loss", "mgd_loss", "reverse_kl_loss",
        "simkd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss", "triangular_loss",
        "entropy_gated_kl_loss", "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss",
        "teacher_topk", "topk_from_logits",  # issue 21
        "uld_loss", "hybrid_uld_loss", "merge_aligned",
    ],
    "fastkd.teacher": ["teacher_topk", "topk_from_logits"],
    "fastkd.reference": [
        "LossParts", "ats_loss", "dist_loss", "dkd_loss", "ipw_weights", "jsd_loss", "kd_loss", "kd_topk_loss",
        "mgd_keep_mask", "mgd_loss", "reverse_kl_loss", "simkd_loss", "skew_kl_loss", "topk_log_probs", "tvd_loss",
        "jeffreys_loss", "triangular_loss",
        "entropy_gated_kl_loss", "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss",
        "uld_loss",
    ],
    "fastkd.cache": ["CacheError", "TeacherCache", "TeacherCacheWriter", "collate", "from_axolotl", "to_axolotl"],
    "fastkd.distributed": [
        "PER_ROW_FLOATS", "ats_loss", "comm_stats", "count_comm", "dist_loss", "dkd_loss", "jsd_loss", "kd_loss",
        "reset_comm_stats", "reverse_kl_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss", "triangular_loss",
        "entropy_gated_kl_loss", "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss", "akl_loss",
        # documented knobs and helpers outside __all__
        "CHUNK_MAX", "CHUNK_MIN_ROWS", "CommStats", "SHARD_KERNELS", "fused_linear_row_op", "shard_kernels",
    ],
}

# Layers, lowest first: a module may import from its own layer or a lower one (docs/design.md).
LAYERS = [
    ("fastkd.core",),
    ("fastkd.triton", "fastkd._C"),
    ("fastkd.dispatch",),
    ("fastkd.reference",),
    ("fastkd.distributed",),
    ("fastkd.losses", "fastkd.functional", "fastkd.teacher"),
    ("fastkd.nn",),
    ("fastkd.cache",),
    ("fastkd",),
    ("fastkd.integrations",),  # the trainers' glue (transformers, TRL): above the library
    ("fastkd.verify", "fastkd.bench", "fastkd.cache.build", "fastkd.cache.__main__"),  # tools (the cache's CLI)
]
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastkd"
MAX_MODULE_LINES = 600


def _modules():
    """{dotted name: path} of every Python module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path):
    """The fastkd modules ``name`` imports (anywhere in the file, function bodies included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastkd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "fastkd":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in _MODULES or candidate == "fastkd._C" else module)
    return {m for m in found if m != name}


_MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def _graph():
    return {name: {m for m in _imports(name, path) if m in _MODULES or m == "fastkd._C"}
            for name, path in _MODULES.items()}


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_names_still_importable(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC_NAMES[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def test_no_import_cycles():
    graph = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_imports_a_layer_above_it():
    wrong = [f"{name} ({_layer(name)}) imports {dep} ({_layer(dep)})"
             for name, deps in _graph().items() for dep in deps if _layer(dep) > _layer(name)]
    assert not wrong, "\n".join(wrong)


def test_library_never_imports_the_benchmarks():
    graph = _graph()
    seen, todo = set(), ["fastkd"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
    assert not [m for m in seen if m.startswith("fastkd.bench")], sorted(m for m in seen if "bench" in m)
    assert not [m for m in seen if m.startswith("fastkd.integrations")], "the library imports its integrations"


def test_layer_table_catches_an_upward_import():
    # the check above can fail: core importing the losses would be flagged
    assert _layer("fastkd.losses.divergence") > _layer("fastkd.core.checks")
    assert _layer("fastkd.bench.kernels") > _layer("fastkd")


def test_modules_are_small():
    big = {name: n for name, path in _MODULES.items()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_setting_a_distributed_knob_reaches_the_losses():
    import fastkd.distributed as D
    from fastkd.distributed import settings

    saved = D.SHARD_KERNELS
    try:
        D.SHARD_KERNELS = "off"
        assert settings.SHARD_KERNELS == "off"
    finally:
        D.SHARD_KERNELS = saved
    assert settings.SHARD_KERNELS == saved
