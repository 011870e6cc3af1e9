"""The architecture, checked from the source (ast only, nothing imported, well under a second).

1. No import runs up a layer (`LAYERS`, low to high; function-level imports included).
2. No import cycle among flagscale modules (module-level imports: the ones that run on import).
3. No function or method over 60 lines, except Triton kernels (`@triton.jit`).
4. USE_FLAGGEMS is read in exactly one function.
5. serve/app.py is wiring: at most 350 lines, no JSON / msgpack / base64 / pydantic parsing.

Each check is a function of {path: source}; the `*_catches_*` tests feed it a small bad tree, so
every assertion is known to be able to fail.
"""

import ast
import fnmatch
import functools

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Low to high. A module may import its own layer, a lower one, or a leaf; never a higher layer.
# The most specific pattern wins (an exact file over a folder).
LAYERS = [
    ("ops", ["flagscale/ops/*"]),  # the op table and kernels
    ("model", ["flagscale/models/*"]),  # PI0Model, its config, weights, processing, stats, RTC
    # PI0Policy and its run-time helpers (CUDA-graph capture of sample_actions, device checks,
    # timing); the package re-exports PI0Policy
    ("policy", ["flagscale/models/pi0/policy.py", "flagscale/models/pi0/__init__.py"]),
    ("policy", ["flagscale/engine/*"]),
    # the server config: parses YAML, checks stats files (model) and USE_FLAGGEMS (ops)
    ("config", ["flagscale/serve/config.py", "flagscale/serve/flagscale_compat.py"]),
    # config -> ready policy; it builds the image decoders, so codec.py sits here too
    ("engine", ["flagscale/serve/engine.py", "flagscale/serve/codec.py"]),
    # service/protocol: service.py, wire.py, schemas.py, rtc.py, worker.py, limits.py, auth.py,
    # metrics.py, msgpack_codec.py, lerobot_pickle.py
    ("service", ["flagscale/serve/*"]),
    (
        "transport",
        [
            "flagscale/serve/app.py",
            "flagscale/serve/openpi_ws.py",
            "flagscale/serve/lerobot_grpc.py",
            "flagscale/serve/protocol.py",
            "flagscale/serve/middleware.py",
            "flagscale/serve/docs.py",
        ],
    ),
    ("cli", ["flagscale/runner/*", "flagscale/tools/*", "flagscale/serve/run_serve_pi0.py"]),
    ("cli", ["run.py"]),
]
# Importable from any layer; a leaf imports only leaves.
LEAVES = [
    "flagscale/__init__.py",
    "flagscale/logger.py",
    "flagscale/models/names.py",  # variant, slot, dtype and tokenizer names; the num_steps check
    "flagscale/serve/errors.py",  # RequestError and the error-message helpers
    "flagscale/action_chunker.py",  # the client's action queue (numpy only)
]
ORDER = list(dict.fromkeys(name for name, _ in LAYERS))

MAX_FUNCTION_LINES = 60
FLAGGEMS_ENV = "USE_FLAGGEMS"
APP = "flagscale/serve/app.py"
APP_MAX_LINES = 350
APP_FORBIDDEN_MODULES = {
    "json",
    "orjson",
    "ujson",
    "simplejson",
    "msgpack",
    "ormsgpack",
    "base64",
    "pybase64",
    "pydantic",
    "flagscale.serve.msgpack_codec",
}
APP_FORBIDDEN_CALLS = {"loads", "b64decode", "model_validate", "model_validate_json", "parse_obj"}


def _sources(*roots) -> dict:
    out = {}
    for root in roots:
        path = REPO / root
        for f in [path] if path.suffix == ".py" else sorted(path.rglob("*.py")):
            out[f.relative_to(REPO).as_posix()] = f.read_text()
    return out


PRODUCT = _sources("flagscale", "run.py")
EVERYTHING = {**PRODUCT, **_sources("tests", "benchmarks", "examples", "docker")}


@functools.lru_cache(maxsize=None)
def _parse(path: str, source: str) -> ast.Module:
    return ast.parse(source, path)


def _module(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# ---------------------------------------------------------------- imports


def _imports(path: str, tree: ast.Module, modules: set):
    """(target module, line, module_level) for every flagscale import in `tree`. `from pkg import
    name` targets pkg.name when that is a module, else pkg. Imports inside a function, or under
    `if TYPE_CHECKING:`, are not module level."""
    here = _module(path).split(".")
    package = here if path.endswith("__init__.py") else here[:-1]

    def targets(node):
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            parent = ".".join(package[: len(package) - node.level + 1])
            base = f"{parent}.{base}" if base else parent
        return [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]

    def walk(node, module_level):
        for child in ast.iter_child_nodes(node):
            top = module_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                top = False
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    if target == "flagscale" or target.startswith("flagscale."):
                        yield target, child.lineno, module_level
            yield from walk(child, top)

    yield from walk(tree, True)


def _import_graph(sources: dict):
    modules = {_module(p): p for p in sources}
    trees = {p: _parse(p, src) for p, src in sources.items()}
    return modules, {p: list(_imports(p, trees[p], set(modules))) for p in sources}


def _layer(path: str):
    """'leaf', a layer name, or None (a module nobody placed)."""
    if path in LEAVES:
        return "leaf"
    best = None
    for name, patterns in LAYERS:
        for pattern in patterns:
            if fnmatch.fnmatch(path, pattern):
                exact = "*" not in pattern
                score = (exact, len(pattern))
                if best is None or score > best[0]:
                    best = (score, name)
    return best and best[1]


def upward_imports(sources: dict) -> list:
    modules, graph = _import_graph(sources)
    bad = []
    for path, edges in graph.items():
        mine = _layer(path)
        for target, line, _ in edges:
            theirs = _layer(modules.get(target, target))
            if theirs == "leaf" or theirs is None:
                continue
            if mine == "leaf" or ORDER.index(theirs) > ORDER.index(mine):
                bad.append(f"{path}:{line} ({mine}) imports {target} ({theirs})")
    return bad


def unplaced_modules(sources: dict) -> list:
    return sorted(p for p in sources if _layer(p) is None)


def import_cycles(sources: dict) -> list:
    """Strongly connected components (Tarjan) of the module-level import graph, size > 1."""
    modules, graph = _import_graph(sources)
    edges = {
        _module(p): sorted({t for t, _, top in e if top and t in modules and t != _module(p)})
        for p, e in graph.items()
    }
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


# ---------------------------------------------------------------- functions


def _is_kernel(fn) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in fn.decorator_list)


def long_functions(sources: dict, limit: int = MAX_FUNCTION_LINES) -> list:
    """Functions and methods (nested ones too) longer than `limit` lines, `def` to last line."""
    out = []
    for path, src in sources.items():
        for node in ast.walk(_parse(path, src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path}:{node.lineno} {node.name}: {lines} lines")
    return out


# ---------------------------------------------------------------- USE_FLAGGEMS


def flaggems_readers(sources: dict) -> list:
    """Functions that read USE_FLAGGEMS from a mapping: `.get(K)`, `getenv(K)`, `m[K]`, `K in m`
    or a used `.pop(K)`, where K is the literal or a name bound to it (FLAGGEMS_ENV). Messages
    that mention it, writes, and dropping it from a child's environment are not reads."""
    trees = {p: _parse(p, src) for p, src in sources.items()}
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _is_literal(node.value, ()):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def key(node):
        return _is_literal(node, names)

    def reads(node, parent):
        if isinstance(node, ast.Call) and node.args and key(node.args[0]):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            used = not isinstance(parent, ast.Expr)
            return name in ("get", "getenv") or (name == "pop" and used)
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            return key(node.slice)
        if isinstance(node, ast.Compare) and key(node.left):
            return any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
        return False

    found = set()

    def walk(node, where, path):
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{where}.{child.name}" if where else child.name
            if reads(child, node):
                found.add(f"{path}::{where or '<module>'}")
            walk(child, inner, path)

    for path, tree in trees.items():
        walk(tree, "", path)
    return sorted(found)


def _is_literal(node, names) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == FLAGGEMS_ENV
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, ast.Attribute) and node.attr in names


# ---------------------------------------------------------------- app.py


def app_parsing(source: str) -> list:
    """What in app.py parses bodies itself: forbidden imports, parsing calls, or a route
    parameter typed with a pydantic schema (FastAPI would parse the body with it)."""
    tree = ast.parse(source)
    schemas, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "flagscale.serve.schemas":
                schemas.update(a.asname or a.name for a in node.names)
        else:
            modules = []
        for module in modules:
            if {module, module.split(".")[0], module.rpartition(".")[0]} & APP_FORBIDDEN_MODULES:
                bad.append(f"line {node.lineno}: imports {module}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in APP_FORBIDDEN_CALLS:
                bad.append(f"line {node.lineno}: calls {ast.unparse(node.func)}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                used = {n.id for n in ast.walk(arg.annotation or ast.Pass()) if hasattr(n, "id")}
                if used & schemas:
                    bad.append(f"line {node.lineno}: {node.name}({ast.unparse(arg)})")
    return bad


def _calls_into(source: str, module: str) -> list:
    tree = ast.parse(source)
    return [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == module
    ]


# ---------------------------------------------------------------- the checks


def test_every_module_has_a_layer():
    assert unplaced_modules(PRODUCT) == [], "add the module to LAYERS or LEAVES"


def test_no_import_runs_up_a_layer():
    assert upward_imports(PRODUCT) == []


def test_no_import_cycle():
    assert import_cycles(PRODUCT) == []


def test_no_function_over_60_lines_outside_kernels():
    assert long_functions(EVERYTHING) == []


def test_use_flaggems_is_read_in_one_function():
    readers = flaggems_readers(PRODUCT)
    assert len(readers) == 1, readers


def test_app_is_wiring():
    source = PRODUCT[APP]
    assert len(source.splitlines()) <= APP_MAX_LINES
    assert app_parsing(source) == []
    assert {"parse_and_build", "infer_reply"} <= set(_calls_into(source, "wire"))


# ---------------------------------------------------------------- each check can fail


def test_layer_check_catches_an_upward_import_and_an_unplaced_module():
    tree = {
        "flagscale/ops/native.py": "def f():\n    from flagscale.serve import app\n",
        "flagscale/serve/app.py": "from flagscale.ops import native\n",
        "flagscale/serve/errors.py": "from flagscale.models import names\n",
        "flagscale/models/names.py": "import flagscale.serve.app\n",
        "flagscale/elsewhere.py": "",
    }
    assert upward_imports(tree) == [
        "flagscale/ops/native.py:2 (ops) imports flagscale.serve.app (transport)",
        "flagscale/models/names.py:1 (leaf) imports flagscale.serve.app (transport)",
    ]
    assert unplaced_modules(tree) == ["flagscale/elsewhere.py"]


def test_cycle_check_catches_a_cycle_but_not_a_lazy_import():
    tree = {
        "flagscale/serve/a.py": "from flagscale.serve import b\n",
        "flagscale/serve/b.py": "from . import c\n",
        "flagscale/serve/c.py": "import flagscale.serve.a\n",
        "flagscale/serve/d.py": "from flagscale.serve import a\n",
        "flagscale/serve/e.py": "def f():\n    from flagscale.serve import d\n",
    }
    assert import_cycles(tree) == [["flagscale.serve.a", "flagscale.serve.b", "flagscale.serve.c"]]
    tree["flagscale/serve/c.py"] = "def f():\n    import flagscale.serve.a\n"
    assert import_cycles(tree) == []


def test_length_check_catches_a_long_function_but_not_a_kernel():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    method = "".join(f"        x{i} = {i}\n" for i in range(59))  # 60 lines with its def
    tree = {
        "a.py": f"def long():\n{body}",
        "b.py": f"@triton.jit\ndef kernel():\n{body}",
        "c.py": f"class C:\n    def short(self):\n{method}",
    }
    assert long_functions(tree) == ["a.py:1 long: 61 lines"]


def test_flaggems_check_catches_a_second_reader():
    tree = {
        "flagscale/ops/__init__.py": (
            "import os\nFLAGGEMS_ENV = 'USE_FLAGGEMS'\n"
            "def requested(env):\n    return env.get(FLAGGEMS_ENV, 'false')\n"
            "def forward(env):\n    env.pop(FLAGGEMS_ENV, None)\n    env[FLAGGEMS_ENV] = '1'\n"
            "    raise ValueError('set USE_FLAGGEMS=0')\n"
        ),
        "flagscale/runner/x.py": (
            "import os\nfrom flagscale import ops\n"
            "class R:\n    def check(self):\n        return 'USE_FLAGGEMS' in os.environ\n"
            "def peek():\n    return os.environ[ops.FLAGGEMS_ENV]\n"
            "def take(env):\n    return env.pop('USE_FLAGGEMS')\n"
            "def shell():\n    return os.getenv('USE_FLAGGEMS')\n"
        ),
    }
    assert flaggems_readers(tree) == [
        "flagscale/ops/__init__.py::requested",
        "flagscale/runner/x.py::R.check",
        "flagscale/runner/x.py::peek",
        "flagscale/runner/x.py::shell",
        "flagscale/runner/x.py::take",
    ]


def test_app_check_catches_parsing():
    source = (
        "import orjson\nfrom base64 import b64decode\n"
        "from flagscale.serve.schemas import InferRequest as Req\n"
        "async def infer(request: Req):\n    return request.model_validate(1)\n"
    )
    assert app_parsing(source) == [
        "line 1: imports orjson",
        "line 2: imports base64.b64decode",
        "line 5: calls request.model_validate",
        "line 4: infer(request: Req)",
    ]
