"""House rule: diffusion/ is a plain library that imports no orchestration or cloud package."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"prefect", "ray", "mlflow", "dvc", "boto3", "botocore"}
LIBRARY = Path(__file__).resolve().parents[1] / "diffusion"


def test_no_forbidden_import_statements():
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
    assert len(list(LIBRARY.rglob("*.py"))) >= 10      # the scan did see the library


def test_importing_every_module_loads_none_of_them():
    modules = [f"diffusion.{p.stem}" for p in LIBRARY.glob("*.py") if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
