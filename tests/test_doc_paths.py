"""The paths and model names that the serving and evaluation docs tell users to type are the
ones the demo run writes (recipe.layout) and the server answers to (serve.engine.default_name)."""

from __future__ import annotations

import re
from pathlib import Path

from domainlm.eval import harness
from domainlm.recipe import load_recipe
from domainlm.recipe.layout import ALIGN_METHODS
from domainlm.serve.engine import default_name

ROOT = Path(__file__).resolve().parent.parent


def demo_paths() -> set[str]:
    """Every model folder of the demo run, as a path from the repository root."""
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    layout = recipe.layout
    folders = [layout.pretrain_model, layout.lora_merged]
    folders += [layout.sft_model(m) for m in ("full", "selective", "lora", "qlora", "prompt",
                                              "adapter")]
    folders += [layout.align_model(m) for m in ALIGN_METHODS]
    for model in ("base", "lora-merged"):
        folders += [layout.export_target(model, f) for f in ("hf-bf16", "hf-fp16", "int8",
                                                              "int4")]
    return {str(Path(f).resolve().relative_to(ROOT)) if Path(f).is_absolute() else str(f)
            for f in folders}


def test_serve_doc_names_and_adapter_paths_are_real():
    text = (ROOT / "docs" / "serve.md").read_text()
    known = demo_paths()
    adapters = re.findall(r"--adapter (?:\w+=)?(build/\S+)", text)
    models = re.findall(r"--model (build/\S+)", text)
    assert adapters and models
    for path in adapters + models:
        assert path in known, f"docs/serve.md names {path}, which no stage writes"
    # The client examples call the base by its name: its folder's (a folder named model: the
    # parent's), never "model".
    assert 'model="model"' not in text
    served = re.search(r"serve --model (\S+)", text).group(1)
    assert f'model="{default_name(Path(served))}"' in text


def test_harness_docstring_names_an_exported_folder():
    paths = re.findall(r"pretrained=(build/\S+)", harness.__doc__ or "")
    assert paths and all(p in demo_paths() for p in paths)
