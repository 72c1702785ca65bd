"""Nothing diffalign reads can run code: a scan of the source (package, reward plug-ins, scripts)
for the calls that could, and the loaders themselves fed a pickle that carries code."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("diffalign", "rewards", "scripts") for p in (ROOT / folder).rglob("*.py"))
# modules imported by name from user input, each behind an explicit "module:attr" the user wrote
IMPORT_BY_NAME = {"diffalign/rewards.py", "diffalign/methods/__init__.py", "diffalign/text/sampling.py"}
PICKLING_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in PICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        weights_only = _keyword(node, "weights_only")
        if name == "torch.load" and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append(f"{where}: torch.load without weights_only=True")
        if isinstance(weights_only, ast.Constant) and weights_only.value is False:
            found.append(f"{where}: weights_only=False")
        if name in ("torch.save", "eval", "exec", "os.system", "yaml.unsafe_load"):
            found.append(f"{where}: {name}")
        if name == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Name("")) != "_Loader":
            found.append(f"{where}: yaml.load without the safe loader")
        remote = _keyword(node, "trust_remote_code")
        off = isinstance(remote, ast.Constant) and remote.value is False
        users = isinstance(remote, ast.Name) and remote.id == "trust_remote_code"  # the user's own option
        if remote is not None and not (off or users):
            found.append(f"{where}: trust_remote_code not off")
        if name == "importlib.import_module" and rel not in IMPORT_BY_NAME:
            found.append(f"{where}: imports a module by name")
        if _keyword(node, "shell") is not None:
            found.append(f"{where}: a subprocess through the shell")
    return found


def test_the_source_has_no_call_that_could_run_code_it_reads() -> None:
    assert len(SOURCES) > 50
    assert [v for path in SOURCES for v in _violations(path)] == []


@pytest.mark.parametrize(
    ("source", "violation"),
    [
        ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
        ("import torch\ntorch.load('x', weights_only=False)", "weights_only=False"),
        ("from accelerate.utils import load\nload('x', weights_only=False)", "weights_only=False"),
        ("import pickle", "imports pickle"),
        ("from cloudpickle import loads", "imports cloudpickle"),
        ("import torch\ntorch.save({}, 'x')", "torch.save"),
        ("eval('1')", "eval"),
        ("import yaml\nyaml.load('a: 1', Loader=yaml.Loader)", "yaml.load without the safe loader"),
        ("f(trust_remote_code=True)", "trust_remote_code not off"),
        ("import importlib\nimportlib.import_module('os')", "imports a module by name"),
        ("import subprocess\nsubprocess.run('ls', shell=True)", "through the shell"),
    ],
)
def test_the_scan_finds_each_kind_of_violation(tmp_path: Path, source: str, violation: str) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert any(violation in v for v in _violations(path, tmp_path)), _violations(path, tmp_path)


def test_the_yaml_loader_is_safe() -> None:
    from diffalign.config import _Loader

    assert issubclass(_Loader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=_Loader)


class _RunsCode:
    """A pickle that would create ``marker`` when loaded by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "method_state_0.safetensors"])
def test_a_checkpoint_file_that_carries_code_is_refused_without_running_it(tmp_path: Path, name: str) -> None:
    from test_method_contract import Online, _cfg

    from diffalign.training.loop import run_training

    out, marker = tmp_path / "run", tmp_path / "code-ran"
    run_training(Online(_cfg(out, max_steps=2, checkpoint_every=2)))
    file = out / "checkpoints" / "checkpoint-2" / name
    if name.endswith(".bin"):  # torch's zip format, as accelerate writes it
        torch.serialization.save({"state": _RunsCode(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match=rf"{file}: (broken|not a readable checkpoint state)"):
        run_training(Online(_cfg(out, max_steps=4, checkpoint_every=2, resume_from="latest")))
    assert not marker.exists()


def test_remote_code_runs_only_when_the_user_turns_it_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import transformers

    from diffalign.config import ConfigError
    from diffalign.methods import get_method
    from diffalign.text.loading import load_causal_lm
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: seen.append(k["trust_remote_code"]))
    load_causal_lm(str(tmp_path))
    load_causal_lm(str(tmp_path), trust_remote_code=True)
    assert seen == [False, False, True, True]
    assert ModelConfig(pretrained="x").trust_remote_code is False
    cfg = TrainConfig(
        method="diffusion_dpo", model=ModelConfig(pretrained="x", trust_remote_code=True),
        data=DataConfig(path=tmp_path), output_dir=tmp_path / "out",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: diffusion pipelines"):
        get_method("diffusion_dpo")(cfg)
